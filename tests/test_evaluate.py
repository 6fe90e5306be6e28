"""Evaluation end to end on a real warehouse: a finetuned model registered with its bundle, evaluated on the test
split beside the single-task ablation, the baselines and the synthetic export's true risk; promotion by the rule
against the champion scored on the same points; rollback; a corrupt artifact refused; the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from odyssey_batch.evaluation.evaluate import EvaluateOptions, evaluate_model
from odyssey_batch.evaluation.metrics import auroc
from odyssey_batch.registry import CorruptArtifactError, PromotionRule, promote, rollback, versions
from odyssey_batch.registry.bundle import BUNDLE_FILES, load_model, register_run
from odyssey_batch.training.finetune import FinetuneOptions, finetune
from odyssey_batch.training.pretrain import PretrainOptions
from tests.conftest import pretrained_warehouse, run_sql

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"max_length": 64, "batch_size": 32, "lr": 1e-3}


@pytest.fixture(scope="module")
def trained(pg_admin_url, template_db, tmp_path_factory):
    """A synthetic warehouse with a pretrained tiny model, a multitask model (v1) and a single-task ablation."""
    home = tmp_path_factory.mktemp("home")
    options = PretrainOptions(preset="tiny", max_length=64, steps=4)
    with pretrained_warehouse(pg_admin_url, template_db, home, 150, 8, options) as (url, settings, parent):
        multitask = finetune(url, settings, parent, FinetuneOptions(epochs=2, **FAST))
        single = finetune(url, settings, parent, FinetuneOptions(epochs=1, tasks=("mortality_30d",), **FAST))
        version = register_run(url, settings, multitask.training_run_id)
        yield {"url": url, "settings": settings, "parent": parent, "version": version.model_version,
               "single_run": single.training_run_id, "truth": home / "export" / "truth.parquet"}  # fmt: skip


def test_bundle_holds_everything_scoring_needs_and_loads_verified(trained):
    url, settings = trained["url"], trained["settings"]
    registered = versions.get(url, trained["version"])
    assert registered.status == "candidate" and registered.preset == "tiny" and registered.parent_version is None
    assert registered.config["placement"] == "append" and len(registered.config["tasks"]) == 6
    manifest = json.loads(Path(registered.artifact_uri, f"manifest-{registered.checksum}.json").read_text())
    assert set(manifest["files"]) == set(BUNDLE_FILES)
    loaded = load_model(url, settings, trained["version"])
    assert loaded.dataset_version == registered.dataset_version and loaded.max_length == 64
    assert set(loaded.calibration) == set(loaded.tasks) and all(0 < loaded.threshold(t) < 1 for t in loaded.tasks)
    with pytest.raises(ValueError, match="only a succeeded finetuning run"):
        register_run(url, settings, trained["parent"])


def test_evaluate_puts_every_method_on_the_same_test_points(trained):
    url, settings, version = trained["url"], trained["settings"], trained["version"]
    result = evaluate_model(url, settings, version, EvaluateOptions(oracle=str(trained["truth"]), resamples=50))
    rows = pd.DataFrame(versions.evaluations(url, version))
    methods = rows.groupby("task").method.agg(lambda m: sorted(set(m))).to_dict()
    assert methods["mortality_30d"] == ["gbt", "logreg", "model", "oracle", "single_task"]
    assert all(m == ["gbt", "logreg", "model", "oracle"] for t, m in methods.items() if t != "mortality_30d")
    assert set(rows.metric) == {"auroc", "auprc", "f1", "f1_tuned", "brier", "ece"}
    # every method on exactly the test points of ehr.task_label
    truth_counts = dict(run_sql(url, """SELECT task, count(*) FROM ehr.task_label
                                        WHERE split = 'test' AND label IS NOT NULL GROUP BY task"""))  # fmt: skip
    counted = rows.assign(n=rows.n_positive + rows.n_negative).groupby("task").n.agg(set).to_dict()
    assert {t: n for t, n in counted.items()} == {t: {n} for t, n in truth_counts.items()}
    # the oracle row is the true probability's AUROC, computed here independently
    labels = pd.DataFrame(run_sql(url, """SELECT task, patient_id, prediction_time, label::int FROM ehr.task_label
                                          WHERE split = 'test' AND label IS NOT NULL"""),
                          columns=["task", "patient_id", "prediction_time", "label"])  # fmt: skip
    truth = pd.read_parquet(trained["truth"])
    truth["prediction_time"] = pd.to_datetime(truth.prediction_time, utc=True)
    labels["prediction_time"] = pd.to_datetime(labels.prediction_time, utc=True)
    merged = labels.merge(truth, on=["task", "patient_id", "prediction_time"], suffixes=("", "_truth"))
    assert len(merged) == len(labels)
    task = "los_7d"
    expected = auroc(merged[merged.task == task].label.to_numpy(), merged[merged.task == task].probability.to_numpy())
    oracle = rows[(rows.task == task) & (rows.method == "oracle") & (rows.metric == "auroc")].iloc[0]
    assert oracle.value == pytest.approx(expected) and oracle.ci_low <= oracle.value <= oracle.ci_high
    values = rows.value.dropna()
    assert ((values >= 0) & (values <= 1)).all()
    # the report is stored with the model and its summary with the registry row
    registered = versions.get(url, version)
    folder = Path(registered.artifact_uri, "report")
    assert (folder / "report.html").exists() and (folder / f"roc_{task}.png").exists()
    assert "oracle" in (folder / "report.md").read_text()
    assert set(registered.metrics["test"]) == set(truth_counts) and registered.metrics["champion_version"] is None
    assert {r["method"] for r in result.table} == {"model", "single_task", "logreg", "gbt", "oracle"}


def test_promotion_by_the_rule_against_the_champion_on_the_same_points_and_rollback(trained):
    url, settings, first = trained["url"], trained["settings"], trained["version"]
    evaluate_model(url, settings, first, EvaluateOptions(baselines=(), resamples=20))
    assert promote(url, first).promote and versions.champion(url).model_version == first
    # a second model: the paper's prompt placement
    run = finetune(url, settings, trained["parent"], FinetuneOptions(epochs=1, placement="replace", seed=1, **FAST))
    second = register_run(url, settings, run.training_run_id).model_version
    assert versions.get(url, second).parent_version == first
    evaluate_model(url, settings, second, EvaluateOptions(baselines=(), single_task=False, resamples=20))
    rows = pd.DataFrame(versions.evaluations(url, second))
    assert set(rows.method) == {"model", "champion"}
    assert versions.get(url, second).metrics["champion_version"] == first
    # the champion's numbers on the candidate's points equal its own evaluation (same dataset, same points)
    own = pd.DataFrame(versions.evaluations(url, first)).query("method == 'model' and metric == 'auroc'")
    theirs = rows.query("method == 'champion' and metric == 'auroc'")
    assert dict(zip(theirs.task, theirs.value, strict=True)) == pytest.approx(
        dict(zip(own.task, own.value, strict=True)), nan_ok=True
    )
    refused = promote(url, second, PromotionRule(min_mean_gain=1.0))  # nothing beats the champion by 1.0
    assert not refused.promote and "mean" in refused.reason
    assert versions.get(url, second).status == "candidate" and versions.champion(url).model_version == first
    accepted = promote(url, second, PromotionRule(min_mean_gain=-1.0, max_task_drop=1.0))
    assert accepted.promote and versions.champion(url).model_version == second
    assert versions.get(url, first).status == "retired"
    assert rollback(url, actor="test", reason="a bad week").model_version == first
    assert versions.champion(url).model_version == first and versions.get(url, second).status == "retired"


def test_multi_seed_evaluation_reports_mean_and_spread(trained):
    url, settings, version = trained["url"], trained["settings"], trained["version"]
    before = run_sql(url, "SELECT count(*) FROM ops.training_run WHERE kind = 'finetune'")[0][0]
    evaluate_model(url, settings, version, EvaluateOptions(baselines=(), single_task=False, compare_champion=False,
                                                           seeds=2, resamples=10))  # fmt: skip
    # one more finetuning run with the same options and another seed was trained for the estimate
    runs = run_sql(url, """SELECT options->'options'->>'seed' FROM ops.training_run
                           WHERE kind = 'finetune' ORDER BY training_run_id""")  # fmt: skip
    assert len(runs) == before + 1 and runs[-1] == ("1",)
    rows = pd.DataFrame(versions.evaluations(url, version)).query("method == 'model'")
    assert (rows.seeds == 2).all()
    auroc = rows[rows.metric == "auroc"].dropna(subset=["value"])
    assert len(auroc) and auroc["std"].notna().all() and (auroc["std"] >= 0).all()
    again = before + 1  # a second request reuses the sibling instead of training another
    evaluate_model(url, settings, version, EvaluateOptions(baselines=(), single_task=False, compare_champion=False,
                                                           seeds=2, resamples=10))  # fmt: skip
    assert run_sql(url, "SELECT count(*) FROM ops.training_run WHERE kind = 'finetune'")[0][0] == again


def test_commands_and_a_corrupt_artifact_is_refused(trained):
    url, settings = trained["url"], trained["settings"]
    env = {**os.environ, "ODYSSEY_DATABASE_URL": url, "ODYSSEY_HOME": str(settings.home), "COLUMNS": "160"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "odyssey_batch.cli.main", *args], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    listed = cli("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    statuses = {m["model_version"]: m["status"] for m in json.loads(listed.stdout)["models"]}
    assert trained["version"] in statuses
    shown = cli("evaluate", str(trained["version"]), "--baselines", "none", "--resamples", "10")
    assert shown.returncode == 0, shown.stderr
    assert "mortality_30d" in shown.stdout and "AUROC" in shown.stdout and "report.html" in shown.stdout
    weights = Path(versions.get(url, trained["version"]).artifact_uri, "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match=r"model\.safetensors"):
        load_model(url, settings, trained["version"])
    refused = cli("evaluate", str(trained["version"]))
    assert refused.returncode == 2 and "model.safetensors" in refused.stderr
    bad = cli("models", "promote", "999999")
    assert bad.returncode == 2
