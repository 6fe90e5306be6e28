"""The model registry: artifacts with checksums, evaluations, the promotion rule, manual promotion, rollback."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import psycopg2
import pytest

from odyssey_batch import registry
from odyssey_batch.registry import CorruptArtifactError, PromotionRule, artifacts, decide
from odyssey_batch.settings import Settings
from tests.conftest import run_sql


@pytest.fixture
def store(tmp_path: Path) -> Settings:
    """Settings whose object store is a local folder under tmp_path."""
    return Settings(home=tmp_path)


@pytest.fixture
def dataset(db_url: str) -> int:
    """A ready dataset version, as the model rows' foreign key needs."""
    return run_sql(
        db_url,
        "INSERT INTO ops.dataset_version (status, source_runs) VALUES ('ready', '{}') RETURNING dataset_version_id",
    )[0][0]


@pytest.fixture
def training_run(db_url: str, dataset: int) -> int:
    return run_sql(
        db_url,
        """INSERT INTO ops.training_run (kind, dataset_version_id, preset, backend, device, seed, options)
           VALUES ('finetune', %s, 'tiny', 'reference', 'cpu', 0, '{}') RETURNING training_run_id""",
        (dataset,),
    )[0][0]


def model_files(folder: Path, tag: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"weights-{tag}.bin"
    weights.write_bytes(hashlib.sha256(tag.encode()).digest() * 64)
    config = folder / f"config-{tag}.json"
    config.write_text(json.dumps({"tag": tag, "d_model": 16}))
    return {"model.safetensors": weights, "config.json": config}


@pytest.fixture
def new_model(db_url: str, store: Settings, dataset: int, training_run: int, tmp_path: Path):
    """Register a candidate model; returns its version number."""
    count = iter(range(1, 1000))

    def make(**overrides) -> int:
        tag = f"m{next(count)}"
        options = {
            "dataset_version": dataset,
            "training_run_id": training_run,
            "preset": "tiny",
            "config": {"tag": tag},
            "files": model_files(tmp_path / "local" / tag, tag),
            **overrides,
        }
        return registry.register(db_url, store, **options).model_version

    return make


def evaluate(url: str, version: int, model: dict[str, float | None], champion: dict | None = None, against=None):
    """Record test AUROC rows as the evaluate stage would: the model's, and the champion's on the same points."""
    rows = [{"task": t, "split": "test", "method": "model", "metric": "auroc", "value": v} for t, v in model.items()]
    rows += [
        {"task": t, "split": "test", "method": "champion", "metric": "auroc", "value": v}
        for t, v in (champion or {}).items()
    ]
    registry.record_evaluation(url, version, rows)
    if against is not None:
        registry.update_metrics(url, version, {"champion_version": against})


def status(url: str, version: int) -> str:
    return registry.get(url, version).status


def promotions(url: str) -> list[tuple]:
    return run_sql(
        url, "SELECT action, model_version, previous_champion, actor FROM ops.model_promotion ORDER BY promotion_id"
    )


# --- artifacts ---------------------------------------------------------------------------------------------------


def test_register_publishes_files_with_checksums_and_reads_them_back(db_url, store, new_model, tmp_path):
    first = new_model(metrics={"val_loss": 1.5})
    second = new_model(parent_version=first)
    mv = registry.get(db_url, first)
    assert (mv.status, mv.preset, mv.config, mv.metrics) == ("candidate", "tiny", {"tag": "m1"}, {"val_loss": 1.5})
    folder = tmp_path / "objects" / "models" / f"v{first}"
    assert mv.artifact_uri == str(folder)
    stored_manifest = folder / f"manifest-{mv.checksum}.json"  # content-addressed: named by its sha256
    assert mv.checksum == hashlib.sha256(stored_manifest.read_bytes()).hexdigest()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", stored_manifest.name, "model.safetensors"]
    manifest = json.loads(stored_manifest.read_bytes())
    weights = (tmp_path / "local" / "m1" / "weights-m1.bin").read_bytes()
    config = (tmp_path / "local" / "m1" / "config-m1.json").read_bytes()
    assert manifest == {
        "model_version": first,
        "files": {
            "config.json": {"sha256": manifest["files"]["config.json"]["sha256"], "bytes": len(config)},
            "model.safetensors": {"sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)},
        },
    }  # fmt: skip
    assert registry.artifacts.read(store, first, "model.safetensors", expected_manifest_checksum=mv.checksum) == weights
    assert json.loads(artifacts.read(store, first, "config.json", expected_manifest_checksum=mv.checksum)) == {
        "tag": "m1",
        "d_model": 16,
    }
    assert [v.model_version for v in registry.list_versions(db_url)] == [second, first]
    assert registry.get(db_url, second).parent_version == first
    assert registry.champion(db_url) is None

    local = artifacts.fetch(store, first, tmp_path / "fetched", mv.checksum)
    assert (local / "model.safetensors").read_bytes() == weights
    assert (local / "manifest.json").read_bytes() == stored_manifest.read_bytes()

    report = tmp_path / "report.json"
    report.write_text('{"auroc": 0.8}')
    updated = registry.add_files(db_url, store, first, {"reports/evaluation.json": report})
    assert updated.checksum != mv.checksum
    assert artifacts.read(store, first, "reports/evaluation.json", expected_manifest_checksum=updated.checksum) == (
        b'{"auroc": 0.8}'
    )
    # the old manifest is swept once the new one is committed: the registry's old view is stale
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", f"manifest-{updated.checksum}.json", "model.safetensors", "reports"]  # fmt: skip
    with pytest.raises(CorruptArtifactError, match=f"manifest-{mv.checksum}.json is missing"):
        artifacts.read(store, first, "config.json", expected_manifest_checksum=mv.checksum)
    with pytest.raises(LookupError, match="no file 'nope'"):
        artifacts.read(store, first, "nope", expected_manifest_checksum=updated.checksum)
    with pytest.raises(LookupError, match="no model version 99"):
        registry.get(db_url, 99)


def test_corrupted_artifact_is_refused(db_url, store, new_model, tmp_path):
    version = new_model()
    mv = registry.get(db_url, version)
    stored = tmp_path / "objects" / "models" / f"v{version}" / "model.safetensors"
    expected = hashlib.sha256(stored.read_bytes()).hexdigest()
    stored.write_bytes(b"\x00" * stored.stat().st_size)  # same size, other bytes
    actual = hashlib.sha256(stored.read_bytes()).hexdigest()
    with pytest.raises(CorruptArtifactError, match=f"v{version}: model.safetensors .* corrupt") as caught:
        artifacts.read(store, version, "model.safetensors", expected_manifest_checksum=mv.checksum)
    assert expected in str(caught.value) and actual in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert artifacts.read(store, version, "config.json", expected_manifest_checksum=mv.checksum)  # the other is intact

    target = tmp_path / "fetched"
    with pytest.raises(CorruptArtifactError, match=r"model.safetensors"):
        artifacts.fetch(store, version, target, mv.checksum)
    assert not (target / "model.safetensors").exists() and not list(target.glob("*.part"))


def test_missing_artifact_and_tampered_manifest_are_refused(db_url, store, new_model, tmp_path):
    version = new_model()
    mv = registry.get(db_url, version)
    folder = tmp_path / "objects" / "models" / f"v{version}"
    (folder / "config.json").unlink()
    with pytest.raises(CorruptArtifactError, match=f"v{version}: config.json is missing"):
        artifacts.read(store, version, "config.json", expected_manifest_checksum=mv.checksum)
    with pytest.raises(CorruptArtifactError, match=r"config.json is missing"):
        artifacts.fetch(store, version, tmp_path / "fetched", mv.checksum)

    manifest = folder / f"manifest-{mv.checksum}.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"bytes"', b'"bytes" ', 1))
    with pytest.raises(CorruptArtifactError, match=f"v{version}: manifest at .* registry expects {mv.checksum}"):
        artifacts.read(store, version, "model.safetensors", expected_manifest_checksum=mv.checksum)
    manifest.unlink()
    with pytest.raises(CorruptArtifactError, match=rf"manifest-{mv.checksum}.json is missing"):
        artifacts.read(store, version, "model.safetensors", expected_manifest_checksum=mv.checksum)


def test_failed_publish_leaves_nothing_registered(db_url, store, dataset, tmp_path):
    files = model_files(tmp_path / "local", "x")
    files["tokenizer.json"] = tmp_path / "local" / "does-not-exist.json"
    with pytest.raises(FileNotFoundError):
        registry.register(db_url, store, dataset_version=dataset, training_run_id=None, preset="tiny", config={},
                          files=files)  # fmt: skip
    assert registry.list_versions(db_url) == []
    assert not list((tmp_path / "objects").rglob("manifest*.json"))  # a crash mid-copy leaves no manifest
    with pytest.raises(ValueError, match=r"manifest.json"):
        registry.register(db_url, store, dataset_version=dataset, training_run_id=None, preset="tiny", config={},
                          files={"manifest.json": tmp_path / "local" / "config-x.json"})  # fmt: skip
    with pytest.raises(ValueError, match="invalid model file name"):
        registry.register(db_url, store, dataset_version=dataset, training_run_id=None, preset="tiny", config={},
                          files={"../escape": tmp_path / "local" / "config-x.json"})  # fmt: skip
    assert registry.list_versions(db_url) == []


def test_evaluations_are_upserted_and_read_back(db_url, new_model):
    version = new_model()
    rows = [
        {"task": "a", "split": "test", "method": "model", "metric": "auroc", "value": 0.8, "ci_low": 0.7,
         "ci_high": 0.9, "seeds": 3, "std": 0.01, "n_positive": 10, "n_negative": 90},
        {"task": "b", "split": "test", "method": "model", "metric": "auroc", "value": float("nan")},
        {"task": "a", "split": "validation", "method": "logreg", "metric": "f1_tuned", "value": 0.5},
    ]  # fmt: skip
    assert registry.record_evaluation(db_url, version, rows) == 3
    registry.record_evaluation(db_url, version, [{**rows[0], "value": 0.85}])
    test_rows = registry.evaluations(db_url, version)
    assert [(r["task"], r["value"], r["seeds"], r["n_positive"]) for r in test_rows] == [
        ("a", 0.85, 3, 10),
        ("b", None, 1, None),
    ]
    assert len(registry.evaluations(db_url, version, split=None)) == 3
    registry.record_evaluation(db_url, version, [{**rows[0], "value": 0.9}], replace=True)
    assert [(r["task"], r["value"]) for r in registry.evaluations(db_url, version)] == [("a", 0.9)]
    assert len(registry.evaluations(db_url, version, split="validation")) == 1  # other (split, method) untouched
    with pytest.raises(ValueError, match="unknown evaluation column"):
        registry.record_evaluation(db_url, version, [{**rows[0], "auroc": 1}])
    with pytest.raises(psycopg2.errors.CheckViolation):
        registry.record_evaluation(db_url, version, [{**rows[0], "metric": "accuracy"}])
    merged = registry.update_metrics(db_url, version, {"champion_version": 7})
    assert merged.metrics == {"champion_version": 7}


# --- the rule ------------------------------------------------------------------------------------------------------


def test_decide_without_champion_promotes():
    decision = decide({"a": 0.7, "b": 0.8}, None, PromotionRule())
    assert decision.promote and decision.reason.startswith("no champion yet")
    assert not decide({"a": None}, None, PromotionRule()).promote  # nothing measured


def test_decide_better_mean_promotes():
    decision = decide({"a": 0.83, "b": 0.81}, {"a": 0.82, "b": 0.80}, PromotionRule(), champion_version=3)
    assert decision.promote
    assert decision.reason.startswith("mean AUROC 0.820 vs champion v3 0.810 (+0.010 ≥ 0.000)")
    assert decision.details["mean_gain"] == pytest.approx(0.01)


def test_decide_worse_mean_refuses():
    decision = decide({"a": 0.81, "b": 0.814}, {"a": 0.82, "b": 0.82}, PromotionRule(), champion_version=3)
    assert not decision.promote
    assert decision.reason == "mean AUROC 0.812 vs champion v3 0.820 (−0.008 < 0.000)"


def test_decide_refuses_a_task_drop_beyond_the_margin_even_when_the_mean_improves():
    candidate = {"mortality": 0.90, "readmission_30d": 0.700, "los": 0.90}
    champion = {"mortality": 0.80, "readmission_30d": 0.731, "los": 0.80}
    decision = decide(candidate, champion, PromotionRule(), champion_version=2)
    assert not decision.promote
    assert decision.reason.startswith("readmission_30d drops 0.031 > 0.020; mean AUROC")
    assert decision.details["drops"] == {"readmission_30d": pytest.approx(0.031)}
    # a drop of exactly the margin is allowed (no float noise), and the margin is configurable
    assert decide({"a": 0.78, "b": 0.9}, {"a": 0.80, "b": 0.8}, PromotionRule()).promote
    assert decide(candidate, champion, PromotionRule(max_task_drop=0.05)).promote
    assert not decide(candidate, champion, PromotionRule(max_task_drop=0.05, min_mean_gain=0.1)).promote


def test_decide_compares_only_common_tasks_and_refuses_without_any():
    decision = decide({"a": 0.9, "b": 0.1, "c": None}, {"a": 0.8, "c": 0.99, "d": 0.5}, PromotionRule())
    assert decision.promote and decision.details["compared"] == 1
    assert decision.details["candidate_only"] == ["b"] and decision.details["champion_only"] == ["c", "d"]
    none_common = decide({"a": 0.9}, {"b": 0.8}, PromotionRule(), champion_version=4)
    assert not none_common.promote and "no tasks with a test AUROC in common with the champion v4" in (
        none_common.reason
    )


def test_decide_lower_is_better_metrics():
    rule = PromotionRule(metric="brier")
    assert decide({"a": 0.10}, {"a": 0.12}, rule).promote
    refused = decide({"a": 0.15, "b": 0.05}, {"a": 0.12, "b": 0.10}, rule)
    assert not refused.promote and refused.reason.startswith("a worsens 0.030 > 0.020")
    with pytest.raises(ValueError, match="unknown metric"):
        PromotionRule(metric="accuracy")


# --- promotion -----------------------------------------------------------------------------------------------------


def test_promotion_replaces_the_champion_only_when_the_candidate_is_better(db_url, new_model):
    first, second, third = new_model(), new_model(), new_model()

    evaluate(db_url, first, {"mortality_inhospital": 0.80, "readmission_30d": 0.70, "los_7d": 0.75})
    decision = registry.promote(db_url, first, PromotionRule())
    assert decision.promote and "no champion yet" in decision.reason
    assert registry.champion(db_url).model_version == first

    scores = {"mortality_inhospital": 0.84, "readmission_30d": 0.71, "los_7d": 0.76}
    evaluate(db_url, second, scores, champion={**scores, "mortality_inhospital": 0.81, "los_7d": 0.74}, against=first)
    decision = registry.promote(db_url, second, PromotionRule())
    assert decision.promote, decision.reason
    assert f"vs champion v{first}" in decision.reason
    assert (status(db_url, first), status(db_url, second)) == ("retired", "champion")
    assert registry.get(db_url, first).status_reason.startswith(f"replaced by v{second}")
    assert registry.get(db_url, second).status_reason == decision.reason

    worse = {"mortality_inhospital": 0.80, "readmission_30d": 0.70, "los_7d": 0.75}
    evaluate(db_url, third, worse, champion=scores, against=second)
    decision = registry.promote(db_url, third, PromotionRule(), actor="nightly")
    assert not decision.promote
    assert decision.reason.startswith(f"mean AUROC 0.750 vs champion v{second} 0.770 (−0.020 < 0.000)")
    third_row = registry.get(db_url, third)
    assert (third_row.status, third_row.status_reason) == ("candidate", decision.reason)
    assert registry.champion(db_url).model_version == second

    assert promotions(db_url) == [
        ("promote", first, None, "rule"),
        ("promote", second, first, "rule"),
        ("refuse", third, second, "nightly"),
    ]
    details = run_sql(db_url, "SELECT details FROM ops.model_promotion WHERE model_version = %s", (second,))[0][0]
    assert details["champion_version"] == first and details["candidate_version"] == second
    assert details["tasks"]["mortality_inhospital"]["gain"] == pytest.approx(0.03)
    assert registry.history(db_url, third)[0]["reason"] == decision.reason

    with pytest.raises(ValueError, match=f"v{first} is retired: only a candidate"):
        registry.promote(db_url, first, PromotionRule())
    with pytest.raises(ValueError, match="only a candidate"):
        registry.promote(db_url, second, PromotionRule())


def test_a_candidate_evaluated_against_an_older_champion_is_refused(db_url, new_model):
    first, second, third = new_model(), new_model(), new_model()
    evaluate(db_url, first, {"a": 0.7})
    registry.promote(db_url, first, PromotionRule())
    # third is evaluated while first is champion ...
    evaluate(db_url, third, {"a": 0.9}, champion={"a": 0.7}, against=first)
    # ... then second becomes champion
    evaluate(db_url, second, {"a": 0.8}, champion={"a": 0.7}, against=first)
    assert registry.promote(db_url, second, PromotionRule()).promote
    decision = registry.promote(db_url, third, PromotionRule())
    assert not decision.promote
    assert decision.reason == f"not evaluated against the current champion v{second}: run evaluate again"
    assert status(db_url, third) == "candidate"
    # champion numbers missing altogether: refused the same way
    fourth = new_model()
    evaluate(db_url, fourth, {"a": 0.95}, against=second)
    assert "not evaluated against the current champion" in registry.promote(db_url, fourth, PromotionRule()).reason


def test_a_candidate_without_evaluation_is_refused(db_url, new_model):
    version = new_model()
    decision = registry.promote(db_url, version, PromotionRule())
    assert not decision.promote and decision.reason.startswith("not evaluated")
    assert registry.champion(db_url) is None
    assert promotions(db_url) == [("refuse", version, None, "rule")]


def test_rollback_restores_the_previous_champion(db_url, new_model):
    first, second = new_model(), new_model()
    with pytest.raises(LookupError, match="no champion to roll back"):
        registry.rollback(db_url, actor="alice", reason="bad scores")
    evaluate(db_url, first, {"a": 0.7})
    registry.promote(db_url, first, PromotionRule())
    with pytest.raises(LookupError, match=f"champion v{first} replaced no earlier champion"):
        registry.rollback(db_url, actor="alice", reason="bad scores")

    evaluate(db_url, second, {"a": 0.8}, champion={"a": 0.7}, against=first)
    registry.promote(db_url, second, PromotionRule())
    restored = registry.rollback(db_url, actor="alice", reason="calibration drift on ward 7")
    assert restored.model_version == first and restored.status == "champion"
    assert status(db_url, second) == "retired"
    assert "calibration drift on ward 7" in registry.get(db_url, second).status_reason
    assert promotions(db_url)[-1] == ("rollback", first, second, "alice")
    # a second rollback undoes the first (the previous champion of the rollback that crowned v1)
    assert registry.rollback(db_url, actor="alice", reason="undo").model_version == second
    with pytest.raises(ValueError, match="give a reason"):
        registry.rollback(db_url, actor="alice", reason=" ")


def test_force_promote_is_recorded(db_url, new_model):
    first, second, third = new_model(), new_model(), new_model()
    evaluate(db_url, first, {"a": 0.7})
    registry.promote(db_url, first, PromotionRule())
    forced = registry.force_promote(db_url, third, actor="bob", reason="hotfix for a coding change")
    assert (
        forced.status == "champion" and forced.status_reason == "promoted manually by bob: hotfix for a coding change"
    )
    assert (status(db_url, first), status(db_url, second)) == ("retired", "candidate")
    # a retired version can be brought back by hand (not by the rule)
    assert registry.force_promote(db_url, first, actor="bob", reason="back").model_version == first
    assert status(db_url, third) == "retired"
    assert promotions(db_url)[1:] == [("manual_promote", third, first, "bob"), ("manual_promote", first, third, "bob")]
    with pytest.raises(ValueError, match="already the champion"):
        registry.force_promote(db_url, first, actor="bob", reason="again")
    assert registry.rollback(db_url, actor="bob", reason="no, the hotfix").model_version == third


def test_the_database_allows_one_champion_at_most(db_url, new_model):
    first, second = new_model(), new_model()
    registry.force_promote(db_url, first, actor="bob", reason="first")
    with pytest.raises(psycopg2.errors.UniqueViolation):
        run_sql(db_url, "UPDATE ops.model_version SET status = 'champion' WHERE model_version = %s", (second,))
    with pytest.raises(psycopg2.errors.CheckViolation):
        run_sql(db_url, "UPDATE ops.model_version SET status = 'gold' WHERE model_version = %s", (second,))


def test_concurrent_promotions_cannot_both_win(db_url, new_model):
    candidates = [new_model(), new_model()]
    for version in candidates:
        evaluate(db_url, version, {"a": 0.8})  # both evaluated with no champion yet
    barrier = threading.Barrier(2)
    decisions = {}

    def go(version: int) -> None:
        barrier.wait()
        decisions[version] = registry.promote(db_url, version, PromotionRule())

    threads = [threading.Thread(target=go, args=(v,)) for v in candidates]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(d.promote for d in decisions.values()) == [False, True]
    winner = next(v for v, d in decisions.items() if d.promote)
    loser = next(v for v, d in decisions.items() if not d.promote)
    assert registry.champion(db_url).model_version == winner
    assert decisions[loser].reason == f"not evaluated against the current champion v{winner}: run evaluate again"
