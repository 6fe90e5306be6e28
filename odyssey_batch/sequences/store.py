"""Reading a dataset version back: its manifest, vocabulary and bins, sequence shards and labels."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from odyssey_batch.sequences.labs import LabBins
from odyssey_batch.sequences.vocab import Vocabulary
from odyssey_batch.settings import Settings
from odyssey_batch.storage import open_location
from odyssey_batch.warehouse import connect


@dataclass
class Dataset:
    version: int
    manifest: dict
    settings: Settings

    @property
    def vocabulary(self) -> Vocabulary:
        return Vocabulary.from_dict(self.manifest["vocabulary"])

    @property
    def bins(self) -> LabBins:
        return LabBins.from_dict(self.manifest["lab_bins"])

    @property
    def excluded(self) -> dict[str, int]:
        """What the data-quality gate left out of this dataset (patients, records), as tokenize counted it."""
        return dict(self.manifest["counts"].get("excluded", {}))

    def _read(self, name: str) -> pa.Table:
        location = open_location(self.settings.object_store_location, self.settings)
        with location.open(f"datasets/v{self.version}/{name}") as fh:
            return pq.read_table(io.BytesIO(fh.read()))

    def sequences(self) -> Iterator[pa.Table]:
        """The sequence shards, one table at a time (a patient per row, one list column per stream)."""
        for name in self.manifest["files"]["sequences"]:
            yield self._read(name)

    def labels(self) -> pa.Table:
        return self._read(self.manifest["files"]["labels"])


def latest_version(url: str) -> int:
    conn = connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT max(dataset_version_id) FROM ops.dataset_version WHERE status = 'ready'")
            version = cur.fetchone()[0]
    finally:
        conn.close()
    if version is None:
        raise LookupError("no dataset has been built yet: run `odyssey-batch tokenize` first")
    return version


def open_dataset(url: str, settings: Settings, version: int | None = None) -> Dataset:
    version = latest_version(url) if version is None else version
    location = open_location(settings.object_store_location, settings)
    try:
        with location.open(f"datasets/v{version}/manifest.json") as fh:
            manifest = orjson.loads(fh.read())
    except Exception as exc:  # a missing file, or a missing S3 object (S3Error)
        raise LookupError(f"dataset version {version} is not in the object store ({location.uri})") from exc
    return Dataset(version, manifest, settings)
