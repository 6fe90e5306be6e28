"""Multitask prompted finetuning on a real warehouse: prompts end with the task token at the prediction time,
tasks are balanced, one model scores every task, and scoring by one recurrent step per task equals re-encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from odyssey_batch import registry
from odyssey_batch.evaluation.calibration import Calibrator
from odyssey_batch.model.classifier import EHRMambaForTasks
from odyssey_batch.registry import CorruptArtifactError
from odyssey_batch.registry.bundle import register_run
from odyssey_batch.sequences.grammar import TokenType, task_token
from odyssey_batch.sequences.store import open_dataset
from odyssey_batch.training.checkpoint import latest_checkpoint, load_checkpoint
from odyssey_batch.training.data import collate
from odyssey_batch.training.finetune import (
    FinetuneOptions,
    balance,
    best_checkpoint,
    finetune,
    load_calibration,
    task_examples,
)
from odyssey_batch.training.pretrain import PretrainOptions
from tests.conftest import pretrained_warehouse, run_sql

TASKS = ["mortality_30d", "los_7d", "readmission_30d", "hypertension_1y", "fluid_electrolyte_1y",
         "lipid_disorder_1y"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained(pg_admin_url, template_db, tmp_path_factory):
    options = PretrainOptions(preset="tiny", max_length=64, steps=4)
    with pretrained_warehouse(pg_admin_url, template_db, tmp_path_factory.mktemp("home"), 80, 21, options) as built:
        yield built


def test_prompts_end_with_the_task_token_at_the_prediction_time(pretrained):
    url, settings, _ = pretrained
    dataset = open_dataset(url, settings)
    examples = task_examples(dataset, "train", TASKS, 64)
    labels = dataset.labels().to_pandas()
    known = labels[(labels.split == "train") & labels.label.notna()]
    assert len(examples) == len(known) > 100
    assert {e.task for e in examples} == set(TASKS)
    for e in examples[:300]:
        s = e.streams
        assert len(s["token_ids"]) <= 64 and s["token_ids"][0] == 3
        assert s["token_ids"][-1] == dataset.vocabulary.id(task_token(e.task)) and s["type_ids"][-1] == TokenType.TASK
        assert np.all(s["times"][:-1] <= s["times"][-1] + 1e-9)  # nothing after the prediction time
    balance(examples, "tasks")
    per_task = {t: sum(e.weight for e in examples if e.task == t) for t in TASKS}
    assert np.mean([e.weight for e in examples]) == pytest.approx(1.0)
    assert max(per_task.values()) == pytest.approx(min(per_task.values()))


def test_one_finetuned_model_scores_every_task(pretrained):
    url, settings, parent = pretrained
    result = finetune(url, settings, parent, FinetuneOptions(max_length=64, batch_size=32, epochs=2, lr=1e-3))
    assert result.parent_run_id == parent and 1 <= result.best_epoch <= result.epochs <= 2
    assert set(result.points["train"]) == set(TASKS) and result.val_loss < 1.0
    row = run_sql(url, "SELECT kind, status, parent_run_id, val_loss FROM ops.training_run WHERE training_run_id = %s",
                  (result.training_run_id,))[0]  # fmt: skip
    assert row[:3] == ("finetune", "succeeded", parent) and row[3] == pytest.approx(result.val_loss, rel=1e-4)
    model, meta, _ = load_checkpoint(settings, latest_checkpoint(settings, result.training_run_id), trainer=False)
    assert isinstance(model, EHRMambaForTasks) and meta["tasks"] == TASKS and meta["parent_run_id"] == parent
    model.eval()
    # all tasks of a patient: encode the history once, then one recurrent step per task token
    dataset = open_dataset(url, settings)
    example = task_examples(dataset, "validation", TASKS, 64)[0]
    history = {k: v[:-1] for k, v in example.streams.items()}
    streams, lengths = collate([history])
    with torch.no_grad():
        _, cache = model.backbone.prefill(streams, lengths)
        ids = torch.tensor([dataset.vocabulary.id(task_token(t)) for t in TASKS])
        last = {k: torch.as_tensor(v[-1:]) for k, v in example.streams.items()}
        tokens = {k: v.repeat(len(TASKS)) for k, v in last.items()}
        tokens["token_ids"] = ids
        stepped = model.score_tasks(cache.select(torch.zeros(len(TASKS), dtype=torch.long)), tokens)
        for i in range(len(TASKS)):  # each equals the whole prompt encoded again
            prompted = {k: v.copy() for k, v in example.streams.items()}
            prompted["token_ids"][-1] = ids[i]
            full, full_lengths = collate([prompted])
            torch.testing.assert_close(stepped[i], model(full, full_lengths)[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown task"):
        finetune(url, settings, parent, FinetuneOptions(tasks=("no_such_task",)))


def test_paper_placement_replaces_cls_and_the_final_reg(pretrained):
    url, settings, _ = pretrained
    dataset = open_dataset(url, settings)
    appended = task_examples(dataset, "train", TASKS, 64, "append")
    replaced = task_examples(dataset, "train", TASKS, 64, "replace")
    assert len(appended) == len(replaced)
    ends_with_reg = 0
    for a, r in zip(appended, replaced, strict=True):
        task_id = dataset.vocabulary.id(task_token(r.task))
        assert a.task == r.task and r.streams["token_ids"][0] == task_id and a.streams["token_ids"][0] == 3
        history = a.streams["token_ids"][:-1]  # the same cut history, [CLS] first
        if len(r.streams["token_ids"]) == len(history):  # the window was not shortened by the appended token
            same = r.streams["token_ids"][1:-1] == history[1:-1]
            assert same.all()
            if r.streams["token_ids"][-1] == task_id:
                ends_with_reg += 1
                assert history[-1] == dataset.vocabulary.id("[REG]")
            else:
                assert r.streams["token_ids"][-1] == history[-1]
    assert ends_with_reg > 50  # discharge-time points end with a visit's [REG]


def test_killed_finetuning_resumes_to_the_same_model_and_calibrates(pretrained):
    url, settings, parent = pretrained
    options = FinetuneOptions(max_length=64, batch_size=32, epochs=3, lr=1e-3, patience=5, seed=3,
                              tasks=("mortality_30d", "readmission_30d"), placement="replace")  # fmt: skip
    whole = finetune(url, settings, parent, options)
    killed = finetune(url, settings, parent, options, stop_after_epochs=1)
    assert not killed.finished and killed.epochs == 1
    status = run_sql(url, "SELECT status FROM ops.training_run WHERE training_run_id = %s", (killed.training_run_id,))
    assert status == [("running",)]
    resumed = finetune(url, settings, None, FinetuneOptions(), resume=killed.training_run_id)
    assert resumed.training_run_id == killed.training_run_id and resumed.placement == "replace"
    assert (resumed.steps, resumed.epochs, resumed.best_epoch) == (whole.steps, whole.epochs, whole.best_epoch)
    assert resumed.val_loss == pytest.approx(whole.val_loss, rel=1e-4)
    calibration = load_calibration(settings, best_checkpoint(settings, resumed.training_run_id))
    assert calibration["placement"] == "replace" and set(calibration["tasks"]) == {"mortality_30d", "readmission_30d"}
    grid = np.linspace(0, 1, 101)
    for fitted in calibration["tasks"].values():
        assert 0 <= fitted["threshold"] <= 1
        if fitted["calibrator"]:
            calibrated = Calibrator.from_dict(fitted["calibrator"])(grid)
            assert fitted["calibrator"]["method"] == "platt"  # the default
            assert bool(np.all(np.diff(calibrated) >= 0)) and 0 <= calibrated.min() <= calibrated.max() <= 1
    with pytest.raises(ValueError, match="not a finetuning run"):
        finetune(url, settings, None, FinetuneOptions(), resume=parent)


def test_registration_verifies_the_checkpoint_it_copies(pretrained):
    url, settings, parent = pretrained
    options = FinetuneOptions(max_length=64, batch_size=32, epochs=1, tasks=("mortality_30d",))
    run = finetune(url, settings, parent, options).training_run_id
    prefix = best_checkpoint(settings, run)
    folder = settings.home / "objects" / prefix
    manifest = json.loads((folder / "manifest.json").read_bytes())
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "trainer.safetensors", "trainer.json",
                                      "calibration.json"}  # fmt: skip
    versions_before = registry.list_versions(url)
    for name in ("model.safetensors", "calibration.json", "config.json"):
        path = folder / name
        good = path.read_bytes()
        flipped = bytearray(good)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(CorruptArtifactError, match=rf"checkpoint file {name} at {path} is corrupt"):
            register_run(url, settings, run)
        assert registry.list_versions(url) == versions_before  # nothing registered
        path.write_bytes(good)
    registered = register_run(url, settings, run)
    assert registry.artifacts.read(settings, registered.model_version, "model.safetensors",
                                   expected_manifest_checksum=registered.checksum) == (folder / "model.safetensors"
                                                                                       ).read_bytes()  # fmt: skip


def test_train_finetune_command(pretrained):
    import json
    import os
    import subprocess
    import sys

    url, settings, parent = pretrained
    env = {**os.environ, "ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(settings.home), "COLUMNS": "160"}
    args = ["train", "finetune", "--from", str(parent), "--tasks", "mortality_30d,los_7d", "--epochs", "1",
            "--max-length", "64", "--batch-size", "32", "--threads", "1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "odyssey_batch.cli.main", *args, "--json"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["points"]["train"]) == {"mortality_30d", "los_7d"} and result["epochs"] == 1
    bad = subprocess.run([sys.executable, "-m", "odyssey_batch.cli.main", "train", "finetune", "--from", "999"],
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr
