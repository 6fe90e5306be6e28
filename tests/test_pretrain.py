"""Pretraining against a real warehouse and object store: a run records itself, checkpoints, and a killed run
resumed from its last checkpoint ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from odyssey_batch.ingest import ingest
from odyssey_batch.quality.gate import validate
from odyssey_batch.registry import CorruptArtifactError
from odyssey_batch.sequences.dataset import TokenizeOptions, tokenize
from odyssey_batch.settings import Settings
from odyssey_batch.synth import generate
from odyssey_batch.training.checkpoint import latest_checkpoint, load_checkpoint
from odyssey_batch.training.pretrain import PretrainOptions, pretrain
from tests.conftest import fresh_database, run_sql

OPTIONS = PretrainOptions(preset="tiny", max_length=64, batch_size=8, steps=10, lr=3e-3, checkpoint_every=4,
                          val_batches=3)  # fmt: skip


@pytest.fixture(scope="module")
def warehouse(pg_admin_url, template_db, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = Settings(home=home, ingest_workers=1)
    export = home / "export"
    generate(export, 40, 9)
    with fresh_database(pg_admin_url, template_db) as url:
        run = ingest(str(export), settings, url=url).run_id
        assert validate(url, settings, run, data_docs=False).success
        tokenize(url, settings, TokenizeOptions(min_count=1))
        yield url, settings


pytestmark = pytest.mark.usefixtures("one_thread")


def weights(settings, run_id):
    prefix = latest_checkpoint(settings, run_id)
    model, meta, state = load_checkpoint(settings, prefix)
    return model.state_dict(), meta, state


def test_pretraining_records_checkpoints_and_lowers_the_loss(warehouse):
    url, settings = warehouse
    result = pretrain(url, settings, None, OPTIONS)
    assert result.finished and result.steps == 10 and result.backend == "torch" and result.device == "cpu"
    row = run_sql(url, "SELECT kind, status, steps, tokens, preset, backend, artifact_uri, val_loss "
                       "FROM ops.training_run WHERE training_run_id = %s", (result.training_run_id,))[0]  # fmt: skip
    assert row[:6] == ("pretrain", "succeeded", 10, result.tokens, "tiny", "torch") and row[7] is not None
    assert row[6] == result.artifact_uri and row[6].endswith("step-00000010")
    _, meta, trainer = weights(settings, result.training_run_id)
    assert meta["dataset_version"] == 1 and meta["options"]["steps"] == 10 and trainer["step"] == 10
    assert "embeddings.word_embeddings.weight" in load_file(os.path.join(row[6], "model.safetensors"))
    first, last = trainer["recent"][0], sum(trainer["recent"][-3:]) / 3
    assert last < first  # the loss goes down


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_run_ends(warehouse):
    url, settings = warehouse
    whole = pretrain(url, settings, None, OPTIONS)
    cut = pretrain(url, settings, None, OPTIONS, stop_after=6)  # dies after step 6; last checkpoint: step 4
    assert not cut.finished
    assert run_sql(url, "SELECT status, steps FROM ops.training_run WHERE training_run_id = %s",
                   (cut.training_run_id,)) == [("running", 4)]  # fmt: skip
    resumed = pretrain(url, settings, None, OPTIONS, resume=cut.training_run_id)
    assert resumed.training_run_id == cut.training_run_id and resumed.steps == whole.steps == 10
    a, _, ta = weights(settings, whole.training_run_id)
    b, _, tb = weights(settings, cut.training_run_id)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert ta["recent"] == pytest.approx(tb["recent"], rel=1e-5) and ta["tokens"] == tb["tokens"]


class Payload:
    """A pickle that writes a marker file when unpickled: what a hostile trainer.pt would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


def test_resume_refuses_a_tampered_or_pickled_trainer_state_and_changes_nothing(warehouse, tmp_path):
    url, settings = warehouse
    cut = pretrain(url, settings, None, OPTIONS, stop_after=6)  # last checkpoint: step 4
    prefix = latest_checkpoint(settings, cut.training_run_id)
    folder = settings.home / "objects" / prefix
    row = "SELECT status, steps, artifact_uri FROM ops.training_run WHERE training_run_id = %s"
    before = run_sql(url, row, (cut.training_run_id,))
    trainer = folder / "trainer.safetensors"
    good = trainer.read_bytes()
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    trainer.write_bytes(bytes(flipped))
    with pytest.raises(CorruptArtifactError, match=rf"checkpoint file trainer.safetensors at {trainer} is corrupt"):
        pretrain(url, settings, None, OPTIONS, resume=cut.training_run_id)
    assert run_sql(url, row, (cut.training_run_id,)) == before
    # a pickle planted as trainer.pt in the layout of older checkpoints (no manifest) is never unpickled
    marker = tmp_path / "marker"
    (folder / "trainer.pt").write_bytes(pickle.dumps(Payload(marker)))
    (folder / "manifest.json").rename(tmp_path / "manifest.json")
    with pytest.raises(CorruptArtifactError, match=r"no readable manifest.json.*trainer.pt is never loaded"):
        pretrain(url, settings, None, OPTIONS, resume=cut.training_run_id)
    assert not marker.exists() and run_sql(url, row, (cut.training_run_id,)) == before
    # restored, the same checkpoint resumes to the end
    (tmp_path / "manifest.json").rename(folder / "manifest.json")
    trainer.write_bytes(good)
    assert pretrain(url, settings, None, OPTIONS, resume=cut.training_run_id).steps == 10


def test_train_pretrain_command(warehouse, tmp_path):
    url, settings = warehouse
    env = {**os.environ, "ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(settings.home), "COLUMNS": "160"}
    proc = subprocess.run(
        [sys.executable, "-m", "odyssey_batch.cli.main", "train", "pretrain", "--preset", "tiny", "--steps", "3",
         "--max-length", "64", "--threads", "1", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["steps"] == 3 and result["tokens"] > 0 and result["parameters"] > 10_000
    help_text = subprocess.run([sys.executable, "-m", "odyssey_batch.cli.main", "train", "pretrain", "--help"],
                               env=env, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "--resume" in help_text and "torchrun" in help_text


def test_torchrun_trains_with_two_processes_on_cpu(warehouse):
    """Scale-out is PyTorch's own DistributedDataParallel (gloo on CPU): two processes share every batch."""
    url, settings = warehouse
    env = {**os.environ, "ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(settings.home), "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "-m", "odyssey_batch.cli.main", "train", "pretrain", "--preset", "tiny",
         "--steps", "2", "--max-length", "64", "--threads", "1", "--json"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # one report, from process 0
    assert run_sql(url, "SELECT world_size, status, steps FROM ops.training_run WHERE training_run_id = %s",
                   (result["training_run_id"],)) == [(2, "succeeded", 2)]  # fmt: skip
