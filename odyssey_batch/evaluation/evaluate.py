"""``odyssey-batch evaluate MODEL``: a model version on the test split of its dataset version, side by side with
everything it should be compared with, on exactly the same prediction points.

Methods (``ops.model_evaluation.method``):

* ``model``: the model version, calibrated, with the F1 threshold chosen on validation (``f1_tuned``);
* ``single_task``: the ablation without MPF — the latest single-task finetuning run per task from the same
  pretraining run, placement and input length, when there is one (``train finetune --single-task``);
* ``logreg`` and ``gbt``: scikit-learn on code counts plus age (the reference design's XGBoost baseline), fitted
  on the train split's points of each task, thresholds chosen on validation;
* ``oracle``: on data from ``odyssey-batch synth``, the hidden risk model's true probability (``--oracle
  truth.parquet``): the best any model could do;
* ``champion``: the current champion scored on these same points (token ids mapped through its own vocabulary),
  what the promotion rule compares with.

Every metric gets a 95% bootstrap interval; with ``seeds`` > 1 the model is finetuned again under other seeds
(sibling runs are reused when they exist) and its values are the mean over seeds, with their standard deviation.
Results go to ``ops.model_evaluation``, a summary to ``ops.model_version.metrics``, and a Markdown/HTML report
with ROC and calibration plots to the model's artifacts (``report/``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from odyssey_batch.evaluation.baselines import BASELINES, code_count_features, fit_baseline
from odyssey_batch.evaluation.metrics import METRICS, Estimate, best_f1_threshold, evaluate_task
from odyssey_batch.evaluation.report import MethodResult, summary_table, write_report
from odyssey_batch.model import default_device
from odyssey_batch.registry import versions
from odyssey_batch.registry.bundle import LoadedModel, load_model
from odyssey_batch.sequences.store import Dataset, open_dataset
from odyssey_batch.settings import Settings
from odyssey_batch.training.data import Streams, load_sequences
from odyssey_batch.training.finetune import (
    DAY,
    Example,
    FinetuneOptions,
    best_checkpoint,
    finetune,
    load_calibration,
    predict_probabilities,
    task_examples,
)
from odyssey_batch.warehouse import connect

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EvaluateOptions:
    baselines: tuple[str, ...] = BASELINES
    oracle: str | None = None  # truth.parquet of a synthetic export
    seeds: int = 1
    resamples: int = 1000
    single_task: bool = True
    compare_champion: bool = True
    batch_size: int = 32


@dataclass
class EvaluationResult:
    model_version: int
    dataset_version: int
    split: str
    points: dict[str, dict[str, int]]
    table: list[dict[str, Any]]
    champion_version: int | None
    report: dict[str, str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _by_task(examples: list[Example], p: np.ndarray, method: str, thresholds: dict[str, float], *,
             resamples: int, std: dict[str, dict[str, float]] | None = None) -> dict[str, MethodResult]:  # fmt: skip
    tasks = np.array([e.task for e in examples])
    y = np.array([e.label for e in examples])
    out = {}
    for task in sorted(set(tasks.tolist())):
        chosen = tasks == task
        threshold = thresholds.get(task, 0.5)
        metrics = evaluate_task(y[chosen], p[chosen], threshold=threshold, resamples=resamples)
        out[task] = MethodResult(method, y[chosen], p[chosen], metrics, threshold, (std or {}).get(task, {}))
    return out


def _key(patient_id: str, task: str, days: float) -> tuple[str, str, int]:
    return patient_id, task, round(days * DAY)


def _oracle(path: str, examples: list[Example]) -> np.ndarray:
    """The true probability of every example (NaN where the truth has no such point)."""
    import pandas as pd

    truth = pd.read_parquet(path, columns=["task", "patient_id", "prediction_time", "probability"])
    seconds = truth.prediction_time.astype("int64") // 10**6  # microseconds since the epoch → seconds
    known = dict(zip(zip(truth.patient_id, truth.task, seconds.round().astype(int), strict=True),
                     truth.probability, strict=True))  # fmt: skip
    return np.array([known.get(_key(e.patient_id, e.task, e.prediction_time), np.nan) for e in examples])


def _remap(examples: list[Example], source: Dataset, target: LoadedModel) -> list[Example]:
    """Examples whose token ids follow ``target``'s vocabulary (tokens it does not know become [UNK])."""
    if source.manifest["vocabulary"] == target.vocabulary.as_dict():
        return examples
    mapping = target.vocabulary.encode(source.vocabulary.tokens)
    out = []
    for e in examples:
        streams = dict(e.streams)
        streams["token_ids"] = mapping[e.streams["token_ids"]]
        out.append(Example(streams, e.task, e.label, e.weight, e.patient_id, e.prediction_time))
    return out


def _single_task_runs(url: str, loaded: LoadedModel) -> dict[str, int]:
    """The latest succeeded single-task finetuning run per task with this model's parent, placement, length."""
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """SELECT DISTINCT ON (options->'options'->'tasks'->>0) options->'options'->'tasks'->>0,
                          training_run_id
                   FROM ops.training_run
                   WHERE kind = 'finetune' AND status = 'succeeded' AND parent_run_id = %s
                     AND dataset_version_id = %s AND jsonb_array_length(options->'options'->'tasks') = 1
                     AND options->'options'->>'placement' = %s AND (options->'options'->>'max_length')::int = %s
                   ORDER BY options->'options'->'tasks'->>0, training_run_id DESC""",
                (loaded.meta["parent_run_id"], loaded.dataset_version, loaded.placement, loaded.max_length),
            )
            return {task: run for task, run in cur.fetchall() if task in loaded.tasks}
    finally:
        conn.close()


def _run_probabilities(settings: Settings, run_id: int, examples: list[Example], batch_size: int,
                       ) -> tuple[np.ndarray, dict[str, dict]]:  # fmt: skip
    """Calibrated probabilities from a finetuning run's best checkpoint, and its calibration."""
    from odyssey_batch.training.checkpoint import load_checkpoint

    prefix = best_checkpoint(settings, run_id)
    model, _, _ = load_checkpoint(settings, prefix, trainer=False)
    calibration = load_calibration(settings, prefix)["tasks"]
    return predict_probabilities(model, examples, calibration, batch_size, default_device()), calibration


def _seed_runs(url: str, settings: Settings, loaded: LoadedModel, seeds: int, say: Progress) -> list[int]:
    """Finetuning runs of the same configuration under other seeds (trained here when missing)."""
    options = dict(loaded.meta["options"])
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """SELECT training_run_id, options->'options' FROM ops.training_run
                   WHERE kind = 'finetune' AND status = 'succeeded' AND parent_run_id = %s
                     AND training_run_id <> %s ORDER BY training_run_id""",
                (loaded.meta["parent_run_id"], loaded.version.training_run_id),
            )
            rows = cur.fetchall()
    finally:
        conn.close()
    same = {k: v for k, v in options.items() if k != "seed"}
    found: dict[int, int] = {}
    for run_id, other in rows:
        if {k: v for k, v in other.items() if k != "seed"} == same and other["seed"] != options["seed"]:
            found.setdefault(other["seed"], run_id)
    runs = list(found.values())[: seeds - 1]
    seed = options["seed"]
    while len(runs) < seeds - 1:
        seed += 1
        if seed in found:
            continue
        say(f"finetuning seed {seed} for the multi-seed estimate")
        chosen = FinetuneOptions(**{**options, "tasks": tuple(options["tasks"]), "seed": seed})
        runs.append(finetune(url, settings, loaded.meta["parent_run_id"], chosen).training_run_id)
    return runs


class _Points:
    """The labelled prediction points of a dataset version as prompted inputs, each set built once: by split,
    tasks, input length and prompt placement (the baselines and the oracle reuse the model's when they match)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._sequences: dict[str, dict[str, Streams]] = {}
        self._examples: dict[tuple, list[Example]] = {}

    def __call__(self, split: str, tasks: list[str], max_length: int, placement: str) -> list[Example]:
        key = (split, tuple(tasks), max_length, placement)
        if key not in self._examples:
            if split not in self._sequences:
                ids, rows = load_sequences(self.dataset, split)
                self._sequences[split] = dict(zip(ids, rows, strict=True))
            self._examples[key] = task_examples(self.dataset, split, tasks, max_length, placement,
                                                sequences=self._sequences[split])  # fmt: skip
        return self._examples[key]


def _baseline(method: str, dataset: Dataset, train: list[Example], validation: list[Example],
              test: list[Example], resamples: int, seed: int) -> dict[str, MethodResult]:  # fmt: skip
    size = len(dataset.vocabulary)
    features = {name: code_count_features([e.streams for e in split], size)
                for name, split in (("train", train), ("validation", validation), ("test", test))}  # fmt: skip
    p_test = np.zeros(len(test))
    thresholds: dict[str, float] = {}
    for task in sorted({e.task for e in test}):
        rows = {name: np.array([e.task == task for e in split])
                for name, split in (("train", train), ("validation", validation), ("test", test))}  # fmt: skip
        y_train = np.array([e.label for e in train])[rows["train"]]
        if not rows["train"].any():
            continue
        fitted = fit_baseline(method, features["train"][rows["train"]], y_train, seed=seed)
        if rows["validation"].any():
            y_val = np.array([e.label for e in validation])[rows["validation"]]
            thresholds[task] = best_f1_threshold(y_val, fitted.predict(features["validation"][rows["validation"]]))
        p_test[rows["test"]] = fitted.predict(features["test"][rows["test"]])
    return _by_task(test, p_test, method, thresholds, resamples=resamples)


def _rows(results: dict[str, list[MethodResult]], split: str) -> list[dict[str, Any]]:
    rows = []
    for task, methods in results.items():
        for r in methods:
            for name in METRICS:
                estimate: Estimate = r.metrics[name]
                rows.append({
                    "task": task, "split": split, "method": r.method, "metric": name, "value": estimate.value,
                    "ci_low": estimate.ci_low, "ci_high": estimate.ci_high, "std": r.std.get(name),
                    "seeds": r.seeds,
                    "n_positive": int(r.y.sum()), "n_negative": int(len(r.y) - r.y.sum()),
                })  # fmt: skip
    return rows


def evaluate_model(url: str, settings: Settings, version: int, options: EvaluateOptions = EvaluateOptions(), *,
                   progress: Progress | None = None) -> EvaluationResult:  # fmt: skip
    """Evaluate model ``version`` on the test split of its dataset version (see the module's docstring)."""
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    unknown = sorted(set(options.baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    loaded = load_model(url, settings, version)
    dataset = open_dataset(url, settings, loaded.dataset_version)
    examples = _Points(dataset)
    say("building the test points")
    test = examples("test", loaded.tasks, loaded.max_length, loaded.placement)
    if not test:
        raise ValueError(f"dataset version {dataset.version} has no labelled test points for the model's tasks")
    results: dict[str, list[MethodResult]] = {}
    notes = [f"Model version {version} (finetuning run {loaded.version.training_run_id}, preset "
             f"{loaded.version.preset}, prompt placement {loaded.placement}) on the test split of dataset version "
             f"{dataset.version}: {len(test)} prediction points."]  # fmt: skip

    say("scoring with the model")
    p_model = loaded.probabilities(test, batch_size=options.batch_size, device=default_device())
    thresholds = {t: loaded.threshold(t) for t in loaded.tasks}
    std: dict[str, dict[str, float]] = {}
    seeds_used = 1
    if options.seeds > 1:
        per_seed = [{t: r.metrics for t, r in _by_task(test, p_model, "model", thresholds, resamples=0).items()}]
        for run_id in _seed_runs(url, settings, loaded, options.seeds, say):
            p_seed, calibration = _run_probabilities(settings, run_id, test, options.batch_size)
            seed_thresholds = {t: float(c.get("threshold", 0.5)) for t, c in calibration.items()}
            per_seed.append({t: r.metrics for t, r in
                             _by_task(test, p_seed, "model", seed_thresholds, resamples=0).items()})  # fmt: skip
        seeds_used = len(per_seed)
        seed_values = {task: {name: [s[task][name].value for s in per_seed if s[task][name].value is not None]
                              for name in METRICS} for task in per_seed[0]}  # fmt: skip
        std = {task: {name: float(np.std(v, ddof=1)) if len(v) > 1 else float("nan") for name, v in values.items()}
               for task, values in seed_values.items()}  # fmt: skip
        notes.append(f"Model values are means over {seeds_used} finetuning seeds (± their standard deviation); "
                     "intervals are the registered model's bootstrap.")  # fmt: skip
    model_results = _by_task(test, p_model, "model", thresholds, resamples=options.resamples, std=std)
    if options.seeds > 1:
        for task, r in model_results.items():
            for name, values in seed_values[task].items():
                if values:
                    r.metrics[name] = Estimate(float(np.mean(values)), r.metrics[name].ci_low, r.metrics[name].ci_high)
            r.seeds = seeds_used
    for task, r in model_results.items():
        results.setdefault(task, []).append(r)

    if options.single_task:
        runs = _single_task_runs(url, loaded)
        for task, run_id in runs.items():
            say(f"scoring with the single-task model of {task} (run {run_id})")
            chosen = [e for e in test if e.task == task]
            p, calibration = _run_probabilities(settings, run_id, chosen, options.batch_size)
            threshold = {task: float((calibration.get(task) or {}).get("threshold", 0.5))}
            for t, r in _by_task(chosen, p, "single_task", threshold, resamples=options.resamples).items():
                results[t].append(r)
        if runs:
            notes.append("single_task: " + ", ".join(f"{t} run {r}" for t, r in sorted(runs.items())) + ".")

    if options.baselines:
        say("fitting the baselines on the train split")
        # the baselines read only the history; build their points with the appended prompt (history intact)
        train = examples("train", loaded.tasks, loaded.max_length, "append")
        validation = examples("validation", loaded.tasks, loaded.max_length, "append")
        test_history = examples("test", loaded.tasks, loaded.max_length, "append")
        for method in options.baselines:
            for task, r in _baseline(method, dataset, train, validation, test_history, options.resamples, 0).items():
                results[task].append(r)

    if options.oracle:
        say("reading the oracle's true probabilities")
        p_true = _oracle(options.oracle, test)
        covered = ~np.isnan(p_true)
        if covered.any():
            validation = examples("validation", loaded.tasks, loaded.max_length, "append")
            p_val = _oracle(options.oracle, validation)
            thresholds_true = {}
            for task in loaded.tasks:
                rows = np.array([e.task == task for e in validation]) & ~np.isnan(p_val)
                if rows.any():
                    y_val = np.array([e.label for e in validation])[rows]
                    thresholds_true[task] = best_f1_threshold(y_val, p_val[rows])
            chosen = [e for e, ok in zip(test, covered, strict=True) if ok]
            for task, r in _by_task(chosen, p_true[covered], "oracle", thresholds_true,
                                    resamples=options.resamples).items():  # fmt: skip
                results[task].append(r)
        notes.append(f"oracle: the synthetic export's true risk, known for {int(covered.sum())} of {len(test)} "
                     "test points.")  # fmt: skip

    champion_version = None
    current = versions.champion(url)
    if options.compare_champion and current is not None and current.model_version != version:
        say(f"scoring with the champion, model version {current.model_version}")
        rival = load_model(url, settings, current.model_version)
        shared = [t for t in loaded.tasks if t in rival.tasks]
        rival_points = examples("test", shared, rival.max_length, rival.placement)
        p = rival.probabilities(
            _remap(rival_points, dataset, rival), batch_size=options.batch_size, device=default_device()
        )
        rival_thresholds = {t: rival.threshold(t) for t in shared}
        for task, r in _by_task(rival_points, p, "champion", rival_thresholds, resamples=options.resamples).items():
            results[task].append(r)
        champion_version = current.model_version
        notes.append(f"champion: model version {champion_version} on the same points.")

    rows = _rows(results, "test")
    versions.record_evaluation(url, version, rows, replace=True)
    summary = {task: {r.method: {m: r.metrics[m].value for m in METRICS} for r in methods}
               for task, methods in results.items()}  # fmt: skip
    say("writing the report")
    with tempfile.TemporaryDirectory(prefix="odyssey-report-") as tmp:
        folder = Path(tmp)
        files = write_report(folder, f"Evaluation of model version {version}", notes, results)
        stored = {f"report/{path.name}": path for path in files.values()}
        (folder / "evaluation.json").write_text(json.dumps({"notes": notes, "metrics": summary}, default=float))
        stored["report/evaluation.json"] = folder / "evaluation.json"
        report: dict[str, str] = {}

        def evaluated(stored_at: dict[str, str]) -> dict[str, Any]:  # committed with the report's checksum
            report.update(stored_at)
            return {
                "test": summary,
                "champion_version": champion_version,
                "report": stored_at.get("report/report.html"),
            }

        versions.add_files(url, settings, version, stored, metrics=evaluated)
    points = {task: {"positive": int(methods[0].y.sum()), "negative": int(len(methods[0].y) - methods[0].y.sum())}
              for task, methods in results.items()}  # fmt: skip
    return EvaluationResult(version, dataset.version, "test", points, summary_table(results), champion_version,
                            report, round(time.perf_counter() - started, 2), notes)  # fmt: skip
