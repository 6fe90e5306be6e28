"""Crash safety of stored artifacts: atomic writes, adding files to a registered model killed at every step,
checkpoints that are verified and never unpickled.

The kill tests run ``registry.add_files`` in a child process that sends itself SIGKILL at one step (in the
middle of a write, after every write but before the commit, after the commit but before the sweep): no
``finally`` runs and Postgres sees the connection drop, as when the machine or the OOM killer stops a task.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from odyssey_batch import registry
from odyssey_batch.model.config import ModelConfig
from odyssey_batch.model.ehrmamba import EHRMamba
from odyssey_batch.registry import CorruptArtifactError, artifacts
from odyssey_batch.settings import Settings
from odyssey_batch.storage.location import LocalLocation, S3Location
from odyssey_batch.training.checkpoint import latest_checkpoint, load_checkpoint, read_file, save_checkpoint
from tests.conftest import run_sql

ROOT = Path(__file__).resolve().parents[1]

# The child: add two files to a version (replacing report/evaluation.json, adding report/report.html) and
# SIGKILL itself at the chosen step. Writes are counted at os.replace (the rename that publishes a local write),
# so "write-N" dies with write N's bytes in its temporary file, not yet renamed.
CHILD = r"""
import os, signal, sys
from pathlib import Path
from odyssey_batch.registry import artifacts, versions
from odyssey_batch.settings import Settings
from odyssey_batch.storage import location

url, home, version, step, folder = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if step.startswith("write-"):
    target, real_replace, count = int(step[len("write-"):]), location.os.replace, [0]
    def replace(src, dst):
        count[0] += 1
        if count[0] == target:
            die()
        real_replace(src, dst)
    location.os.replace = replace
elif step == "before-commit":
    real_add = artifacts.add
    def add(*args, **kwargs):
        real_add(*args, **kwargs)
        die()
    versions.artifacts.add = add
elif step == "before-sweep":
    versions._sweep = lambda *args: die()
files = {"report/evaluation.json": folder / "evaluation-2.json", "report/report.html": folder / "report.html"}
versions.add_files(url, Settings(home=home), version, files,
                   metrics=lambda where: {"report": where["report/report.html"], "evaluated": True})
print("finished")
"""


@pytest.fixture
def store(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path)


@pytest.fixture
def version(db_url: str, store: Settings, tmp_path: Path) -> registry.ModelVersion:
    """A registered version with weights, config and a first evaluation report."""
    dataset = run_sql(db_url, "INSERT INTO ops.dataset_version (status, source_runs) VALUES ('ready', '{}') "
                              "RETURNING dataset_version_id")[0][0]  # fmt: skip
    local = tmp_path / "local"
    local.mkdir()
    (local / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (local / "config.json").write_text('{"d_model": 16}')
    (local / "evaluation-1.json").write_text('{"auroc": 0.71}')
    (local / "evaluation-2.json").write_text('{"auroc": 0.74}')
    (local / "report.html").write_text("<html>AUROC 0.74</html>")
    files = {"model.safetensors": local / "weights.bin", "config.json": local / "config.json"}
    mv = registry.register(db_url, store, dataset_version=dataset, training_run_id=None, preset="tiny", config={},
                           files=files)  # fmt: skip
    return registry.add_files(db_url, store, mv.model_version, {"report/evaluation.json": local / "evaluation-1.json"})


def loaded(settings: Settings, url: str, version: int, into: Path) -> dict[str, bytes]:
    """Every file of the version as the registry's committed checksum names it, downloaded and verified."""
    row = registry.get(url, version)
    folder = artifacts.fetch(settings, version, into, row.checksum)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != "manifest.json"}  # fmt: skip


def stored(tmp_path: Path, version: int) -> list[str]:
    folder = tmp_path / "objects" / "models" / f"v{version}"
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def kill_add(db_url: str, tmp_path: Path, version: int, step: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", CHILD, db_url, str(tmp_path), str(version), step, str(tmp_path / "local")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


BEFORE = {"model.safetensors": bytes(range(256)) * 40, "config.json": b'{"d_model": 16}',
          "report/evaluation.json": b'{"auroc": 0.71}'}  # fmt: skip
AFTER = {**BEFORE, "report/evaluation.json": b'{"auroc": 0.74}', "report/report.html": b"<html>AUROC 0.74</html>"}


@pytest.mark.parametrize("step", ["write-1", "write-2", "write-3", "before-commit"])
def test_an_add_killed_before_its_commit_leaves_the_version_exactly_as_it_was(db_url, store, version, tmp_path, step):
    before = registry.get(db_url, version.model_version)
    objects_before = stored(tmp_path, version.model_version)
    killed = kill_add(db_url, tmp_path, version.model_version, step)
    assert killed.returncode == -signal.SIGKILL and "finished" not in killed.stdout, killed.stderr
    assert registry.get(db_url, version.model_version) == before  # the row, checksum included, is untouched
    assert loaded(store, db_url, version.model_version, tmp_path / "after-kill") == BEFORE
    # what the killed add left (new objects, a temporary file) is named by nothing committed
    left = set(stored(tmp_path, version.model_version)) - set(objects_before)
    assert left and all(n.startswith(("report/", "by-sha256/", "manifest-")) or ".partial" in n for n in left)
    # the next add succeeds and sweeps the leftovers: exactly the files of the new manifest remain
    again = kill_add(db_url, tmp_path, version.model_version, "none")
    assert again.returncode == 0 and "finished" in again.stdout, again.stderr
    after = registry.get(db_url, version.model_version)
    assert after.checksum != before.checksum and before.metrics == {}
    assert loaded(store, db_url, version.model_version, tmp_path / "after-retry") == AFTER
    assert after.metrics["evaluated"] is True
    assert Path(after.metrics["report"]).read_bytes() == AFTER["report/report.html"]  # the link committed with it
    sha = hashlib.sha256(b'{"auroc": 0.74}').hexdigest()
    assert stored(tmp_path, version.model_version) == sorted([  # the replaced report/evaluation.json is swept
        "config.json", "model.safetensors", f"manifest-{after.checksum}.json",
        f"by-sha256/{sha}/report/evaluation.json", "report/report.html"])  # fmt: skip


def test_an_add_killed_after_its_commit_is_complete_and_the_next_add_sweeps(db_url, store, version, tmp_path):
    before = registry.get(db_url, version.model_version)
    killed = kill_add(db_url, tmp_path, version.model_version, "before-sweep")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after = registry.get(db_url, version.model_version)
    assert after.checksum != before.checksum
    assert loaded(store, db_url, version.model_version, tmp_path / "after-kill") == AFTER
    assert after.metrics["evaluated"] is True  # committed with the checksum
    assert f"manifest-{before.checksum}.json" in stored(tmp_path, version.model_version)  # not swept yet
    extra = tmp_path / "local" / "notes.txt"
    extra.write_text("notes")
    final = registry.add_files(db_url, store, version.model_version, {"notes.txt": extra})
    assert loaded(store, db_url, version.model_version, tmp_path / "final") == {**AFTER, "notes.txt": b"notes"}
    names = stored(tmp_path, version.model_version)
    assert f"manifest-{before.checksum}.json" not in names and f"manifest-{after.checksum}.json" not in names
    assert f"manifest-{final.checksum}.json" in names and "report/evaluation.json" not in names  # replaced, swept


def test_a_reader_holding_the_old_checksum_is_refused_not_misled(db_url, store, version, tmp_path):
    old = registry.get(db_url, version.model_version).checksum
    local = tmp_path / "local"
    registry.add_files(db_url, store, version.model_version, {"report/evaluation.json": local / "evaluation-2.json"})
    with pytest.raises(CorruptArtifactError, match=f"manifest-{old}.json is missing"):
        artifacts.fetch(store, version.model_version, tmp_path / "stale", old)
    assert not (tmp_path / "stale" / "report" / "evaluation.json").exists()
    new = registry.get(db_url, version.model_version).checksum
    links = artifacts.where(store, version.model_version, ["report/evaluation.json", "config.json"],
                            expected_manifest_checksum=new)  # fmt: skip
    assert Path(links["report/evaluation.json"]).read_bytes() == b'{"auroc": 0.74}'
    assert "by-sha256" in links["report/evaluation.json"] and links["config.json"].endswith("/config.json")


def test_a_version_registered_with_the_old_single_manifest_still_loads_and_moves_on(db_url, store, version, tmp_path):
    # the layout before content-addressed manifests: one manifest.json, its sha256 in the registry row
    folder = tmp_path / "objects" / "models" / f"v{version.model_version}"
    (folder / f"manifest-{version.checksum}.json").rename(folder / "manifest.json")
    assert loaded(store, db_url, version.model_version, tmp_path / "legacy") == BEFORE
    (folder / "manifest.json").write_bytes((folder / "manifest.json").read_bytes() + b" ")
    with pytest.raises(CorruptArtifactError, match=f"manifest.json has sha256 .* registry expects {version.checksum}"):
        loaded(store, db_url, version.model_version, tmp_path / "tampered")
    (folder / "manifest.json").write_bytes((folder / "manifest.json").read_bytes()[:-1])
    added = registry.add_files(db_url, store, version.model_version,
                               {"report/report.html": tmp_path / "local" / "report.html"})  # fmt: skip
    assert not (folder / "manifest.json").exists() and (folder / f"manifest-{added.checksum}.json").exists()
    assert loaded(store, db_url, version.model_version, tmp_path / "moved") == {
        **BEFORE, "report/report.html": b"<html>AUROC 0.74</html>"}  # fmt: skip


def test_reserved_names_cannot_be_published(db_url, store, version, tmp_path):
    source = tmp_path / "local" / "config.json"
    for name in ("manifest.json", f"manifest-{'0' * 64}.json", "by-sha256/x/config.json", "../x", "/abs"):
        with pytest.raises(ValueError, match=r"manifests are written|registry's own|invalid model file name"):
            registry.add_files(db_url, store, version.model_version, {name: source})
    assert loaded(store, db_url, version.model_version, tmp_path / "same") == BEFORE


# --- atomic writes ---------------------------------------------------------------------------------------------


def test_a_local_write_that_fails_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch):
    location = LocalLocation(tmp_path / "store")
    location.put_bytes("a/b.json", b"old")
    import odyssey_batch.storage.location as module

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        location.put_bytes("a/b.json", b"new bytes")
    source = tmp_path / "source.bin"
    source.write_bytes(b"x" * 3_000_000)
    with pytest.raises(OSError, match="disk full"):
        location.put_file("a/b.json", source)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "store" / "a").iterdir()) == ["b.json"]
    with location.open("a/b.json") as fh:
        assert fh.read() == b"old"
    assert location.put_file("a/b.json", source) == str(tmp_path / "store" / "a" / "b.json")
    assert (tmp_path / "store" / "a" / "b.json").read_bytes() == source.read_bytes()
    location.delete("a/b.json")
    location.delete("a/b.json")  # deleting what is gone is fine
    assert not (tmp_path / "store" / "a" / "b.json").exists()
    for bad in ("../outside.json", "a/../../outside.json", ""):
        with pytest.raises(ValueError, match="not a file name inside"):
            location.put_bytes(bad, b"x")
    assert not (tmp_path / "outside.json").exists()


def test_s3_keys_of_a_model_version():
    settings = Settings(s3_endpoint="127.0.0.1:1", s3_access_key="k", s3_secret_key="s")
    location = S3Location("models-bucket", "/odyssey/store/", settings)
    checksum = hashlib.sha256(b"manifest").hexdigest()
    key = f"{artifacts.prefix(7)}/{artifacts.manifest_name(checksum)}"
    assert location.describe(key) == f"s3://models-bucket/odyssey/store/models/v7/manifest-{checksum}.json"
    assert S3Location("b", "", settings).describe("models/v7/config.json") == "s3://b/models/v7/config.json"
    with pytest.raises(ValueError, match="not a sha256"):
        artifacts.manifest_name("../../etc")


# --- checkpoints -------------------------------------------------------------------------------------------------


class Payload:
    """A pickle that, when unpickled, writes a marker file (what a hostile trainer.pt would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def tiny_checkpoint(settings: Settings) -> tuple[str, torch.nn.Module, dict]:
    """A checkpoint of a tiny model after one optimizer step (so the optimizer state holds tensors)."""
    torch.manual_seed(0)
    model = EHRMamba(ModelConfig(vocab_size=20, d_model=16, n_layers=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    schedule.step()
    trainer = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
               "step": 1, "tokens": 16, "recent": [0.1, 1 / 3],
               "best": {"val_loss": float("inf"), "auroc": {"a": None, "b": 0.5}, "prefix": ""}}  # fmt: skip
    save_checkpoint(settings, 5, 1, model, {"kind": "pretrain", "options": {}}, trainer)
    return latest_checkpoint(settings, 5), model, trainer


def same(a, b) -> bool:
    """Equal trees: same types (tuples stay tuples), tensors equal in dtype, shape and every bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_a_checkpoint_round_trips_exactly_without_pickle(store):
    prefix, model, trainer = tiny_checkpoint(store)
    folder = store.home / "objects" / prefix
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "trainer.json", "trainer.safetensors"]  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_bytes())
    assert manifest["step"] == 1 and manifest["files"]["trainer.safetensors"] == {
        "sha256": hashlib.sha256((folder / "trainer.safetensors").read_bytes()).hexdigest(),
        "bytes": (folder / "trainer.safetensors").stat().st_size}  # fmt: skip
    loaded_model, meta, state = load_checkpoint(store, prefix)
    assert meta["kind"] == "pretrain" and same(trainer, state)
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95) and 0 in state["optimizer"]["state"]
    assert same(model.state_dict(), loaded_model.state_dict())
    resumed = torch.optim.AdamW(loaded_model.parameters(), lr=1e-3)
    resumed.load_state_dict(state["optimizer"])
    assert same(resumed.state_dict(), trainer["optimizer"])


@pytest.mark.parametrize("name", ["trainer.safetensors", "trainer.json", "model.safetensors", "config.json"])
def test_a_flipped_byte_in_a_checkpoint_is_refused_naming_the_file(store, name):
    prefix, _, _ = tiny_checkpoint(store)
    path = store.home / "objects" / prefix / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=rf"checkpoint file {name} at {path} is corrupt: expected sha256"):
        load_checkpoint(store, prefix)


def test_a_planted_pickle_is_never_executed(store, tmp_path):
    prefix, model, _ = tiny_checkpoint(store)
    folder = store.home / "objects" / prefix
    marker = tmp_path / "marker"
    payload = pickle.dumps(Payload(marker))
    # a checkpoint of the current layout that lost its manifest is refused, even to read its weights
    (folder / "manifest.json").rename(tmp_path / "manifest.json")
    for trainer in (True, False):
        with pytest.raises(CorruptArtifactError, match=r"no readable manifest.json"):
            load_checkpoint(store, prefix, trainer=trainer)
    # the layout of an older checkpoint: trainer.pt (a pickle), no manifest, no trainer.json
    for name in ("trainer.json", "trainer.safetensors"):
        (folder / name).unlink()
    (folder / "trainer.pt").write_bytes(payload)
    with pytest.raises(CorruptArtifactError, match=r"no readable manifest.json.*trainer.pt is never loaded"):
        load_checkpoint(store, prefix)  # no resume
    with pytest.raises(CorruptArtifactError, match=r"no readable manifest.json"):
        read_file(store, prefix, "model.safetensors")  # what registration copies: nothing to verify it against
    old_weights, meta, state = load_checkpoint(store, prefix, trainer=False)  # data only: still usable
    assert state is None and meta["kind"] == "pretrain" and same(model.state_dict(), old_weights.state_dict())
    assert not marker.exists()
    (folder / "trainer.pt").unlink()
    (tmp_path / "manifest.json").rename(folder / "manifest.json")
    # the payload under the new names, with a manifest that vouches for it: parsed as data, refused
    manifest = json.loads((folder / "manifest.json").read_bytes())
    for name in ("trainer.safetensors", "trainer.json"):
        (folder / name).write_bytes(payload)
        manifest["files"][name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifactError, match=r"checkpoint file trainer.json at .* is not a valid JSON file"):
        load_checkpoint(store, prefix)
    (folder / "trainer.json").write_text("{}")
    manifest["files"]["trainer.json"] = {"sha256": hashlib.sha256(b"{}").hexdigest(), "bytes": 2}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifactError, match=r"trainer.safetensors at .* is not a valid safetensors file"):
        load_checkpoint(store, prefix)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: unpickling it does write the marker
    assert marker.read_text() == "executed"


def test_models_and_checkpoints_on_a_real_s3_store(db_url, s3_server, tmp_path):
    """The same guarantees on an S3 store (SeaweedFS): a version's files replaced through a new manifest the
    row switches to, the old objects swept after the commit, an object changed after publishing refused by name,
    a checkpoint round trip verified and a tampered trainer state refused."""
    import uuid

    from odyssey_batch.storage.location import s3_client

    bucket = f"artifacts-{uuid.uuid4().hex[:12]}"
    store = Settings(home=tmp_path, object_store=f"s3://{bucket}/odyssey", s3_endpoint=s3_server.endpoint,
                     s3_access_key=s3_server.admin.access_key, s3_secret_key=s3_server.admin.secret_key,
                     s3_region="us-east-1")  # fmt: skip
    client = s3_client(store)
    client.make_bucket(bucket)

    def keys(prefix: str) -> list[str]:
        start = len(f"odyssey/{prefix}/")
        objects = client.list_objects(bucket, prefix=f"odyssey/{prefix}/", recursive=True)
        return sorted(o.object_name[start:] for o in objects)

    dataset = run_sql(db_url, "INSERT INTO ops.dataset_version (status, source_runs) VALUES ('ready', '{}') "
                              "RETURNING dataset_version_id")[0][0]  # fmt: skip
    local = tmp_path / "local"
    local.mkdir()
    (local / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (local / "config.json").write_text('{"d_model": 16}')
    (local / "evaluation-1.json").write_text('{"auroc": 0.71}')
    (local / "evaluation-2.json").write_text('{"auroc": 0.74}')
    files = {"model.safetensors": local / "weights.bin", "config.json": local / "config.json"}
    mv = registry.register(db_url, store, dataset_version=dataset, training_run_id=None, preset="tiny", config={},
                           files=files)  # fmt: skip
    report = "report/evaluation.json"
    first = registry.add_files(db_url, store, mv.model_version, {report: local / "evaluation-1.json"})
    second = registry.add_files(db_url, store, mv.model_version, {report: local / "evaluation-2.json"})

    assert loaded(store, db_url, mv.model_version, tmp_path / "loaded") == {
        "model.safetensors": bytes(range(256)) * 40, "config.json": b'{"d_model": 16}',
        "report/evaluation.json": b'{"auroc": 0.74}'}  # fmt: skip
    replaced = hashlib.sha256(b'{"auroc": 0.74}').hexdigest()
    assert keys(f"models/v{mv.model_version}") == [  # the first report and both earlier manifests are swept
        f"by-sha256/{replaced}/report/evaluation.json", "config.json", f"manifest-{second.checksum}.json",
        "model.safetensors"]  # fmt: skip
    assert first.checksum != second.checksum

    key = f"odyssey/models/v{mv.model_version}/model.safetensors"
    client.put_object(bucket, key, io.BytesIO(b"tampered"), 8)
    with pytest.raises(CorruptArtifactError, match=r"model\.safetensors"):
        loaded(store, db_url, mv.model_version, tmp_path / "tampered")

    prefix, model, trainer = tiny_checkpoint(store)
    assert keys(prefix) == ["config.json", "manifest.json", "model.safetensors", "trainer.json", "trainer.safetensors"]
    loaded_model, _, state = load_checkpoint(store, prefix)
    assert same(trainer, state) and same(model.state_dict(), loaded_model.state_dict())
    client.put_object(bucket, f"odyssey/{prefix}/trainer.json", io.BytesIO(b"{}"), 2)
    with pytest.raises(CorruptArtifactError, match=r"checkpoint file trainer.json at s3://.* is corrupt"):
        load_checkpoint(store, prefix)
