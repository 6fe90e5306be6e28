"""Model inputs from a dataset version: sequences of a split, pretraining windows, length-grouped batches.

Batches group sequences of similar length (little compute spent on padding) and are shuffled as whole
batches, deterministically from the seed and the epoch, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from odyssey_batch.sequences.store import Dataset
from odyssey_batch.sequences.tokens import STREAMS, history_windows

Streams = dict[str, np.ndarray]


def _rows(table: pa.Table) -> list[Streams]:
    columns = {}
    for name in STREAMS:
        column = table.column(name).combine_chunks()
        columns[name] = (column.offsets.to_numpy(), column.values.to_numpy())
    rows = []
    for i in range(table.num_rows):
        rows.append({name: values[offsets[i] : offsets[i + 1]] for name, (offsets, values) in columns.items()})
    return rows


def load_sequences(dataset: Dataset, split: str) -> tuple[list[str], list[Streams]]:
    """Patient ids and streams of one split (``times`` in days)."""
    ids: list[str] = []
    rows: list[Streams] = []
    for table in dataset.sequences():
        table = table.filter(pa.compute.equal(table.column("split"), split))
        ids += table.column("patient_id").to_pylist()
        rows += _rows(table)
    return ids, rows


def pretraining_examples(sequences: list[Streams], max_length: int) -> list[Streams]:
    """Every sequence as consecutive windows of at most ``max_length`` tokens (all tokens are trained on)."""
    return [w for streams in sequences for w in history_windows(streams, max_length) if len(w["token_ids"]) > 1]


def length_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, the batch order shuffled by (seed, epoch)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    permutation = np.random.default_rng([seed, epoch]).permutation(len(batches))
    return [batches[i] for i in permutation]


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def collate(examples: list[Streams], device: torch.device | str = "cpu") -> Batch:
    """Right-padded tensors (batch, longest) and the real lengths. Padding: token 0 ([PAD]), type 0, and the
    row's last time and age (so padding adds no time delta)."""
    lengths = torch.tensor([len(e["token_ids"]) for e in examples])
    longest = int(lengths.max())
    out = {}
    for name in STREAMS:
        dtype = torch.float64 if name == "times" else torch.float32 if name == "ages" else torch.long
        batch = torch.zeros(len(examples), longest, dtype=dtype)
        for i, e in enumerate(examples):
            values = torch.from_numpy(np.asarray(e[name]))
            batch[i, : len(values)] = values
            if name in ("times", "ages") and len(values) < longest:
                batch[i, len(values) :] = values[-1]
        out[name] = batch.to(device)
    return out, lengths.to(device)
