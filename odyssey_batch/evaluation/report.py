"""The evaluation report: per task, a table of every method's metrics, ROC curves and a reliability diagram.

``write_report`` writes into one folder ``report.md``, ``report.html`` (a self-contained page with inline CSS
that shows the images by relative file name, so the folder can be moved or archived as a whole), and per task
``roc_<task>.png`` and ``calibration_<task>.png``. Methods are the finetuned ``model``, a ``single_task`` model,
the ``logreg`` and ``gbt`` baselines, an ``oracle`` or the ``champion`` in production; a result carries its
labels and probabilities (for the plots) and its metrics as computed by ``metrics.py`` (for the tables, which
never recompute them: intervals and multi-seed spreads come from the caller).

Table cells: the value with 3 decimals, ``mean ± std`` when a spread over seeds is given, the 95% bootstrap
interval in brackets for AUROC and AUPRC, and "—" where a metric is undefined (one class only) or missing.
Plots use matplotlib's Agg canvas directly (no pyplot, so no global backend switch and no figure left open).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from odyssey_batch.evaluation.metrics import Estimate, expected_calibration_error, metric

REPORT_METRICS = ("auroc", "auprc", "f1", "f1_tuned", "brier", "ece")
# (header, metric, show the interval)
COLUMNS = (
    ("AUROC [95% CI]", "auroc", True),
    ("AUPRC [95% CI]", "auprc", True),
    ("F1@0.5", "f1", False),
    ("F1@thr (thr)", "f1_tuned", False),
    ("Brier", "brier", False),
    ("ECE", "ece", False),
)
HEADERS = ("method", "n+ / n−", *(c[0] for c in COLUMNS))
BINS = 10
UNDEFINED = "—"
TASK_NAME = re.compile(r"[a-z0-9_]+")
LEGEND = (
    "AUROC and AUPRC with their 95% bootstrap interval; F1@0.5 at threshold 0.5, F1@thr at the threshold chosen "
    f"on validation (in parentheses); Brier score; ECE over {BINS} equal-width bins; mean ± std over seeds where "
    f"given; {UNDEFINED} where undefined."
)
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .35em .7em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f4f7; }
tr:nth-child(even) td { background: #fafbfc; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5em; }
figure { margin: 0; }
img { width: 100%; max-width: 520px; height: auto; border: 1px solid #eee; }
figcaption, .legend { color: #666; font-size: .88em; }
"""


@dataclass
class MethodResult:
    """One method's predictions on one task's test points and their metrics (keys among ``REPORT_METRICS``).

    ``threshold`` is the validation-chosen threshold behind ``f1_tuned``; ``std`` the spread of each metric
    over seeds for a multi-seed run (then ``metrics`` holds the means)."""

    method: str
    y: np.ndarray
    p: np.ndarray
    metrics: dict[str, Estimate]
    threshold: float | None = None
    std: dict[str, float] = field(default_factory=dict)
    seeds: int = 1

    @property
    def n_pos(self) -> int:
        return int((np.asarray(self.y) == 1).sum())

    @property
    def n_neg(self) -> int:
        return len(self.y) - self.n_pos


def _value(result: MethodResult, name: str) -> float | None:
    estimate = result.metrics.get(name)
    return None if estimate is None else estimate.value


def format_cell(result: MethodResult, name: str, interval: bool = False) -> str:
    """A metric as a table cell: ``0.812``, ``0.812 ± 0.010``, ``0.812 [0.780, 0.845]`` or "—"."""
    estimate = result.metrics.get(name)
    if estimate is None or estimate.value is None:
        return UNDEFINED
    text = f"{estimate.value:.3f}"
    if result.std.get(name) is not None:
        text += f" ± {result.std[name]:.3f}"
    if interval and estimate.ci_low is not None and estimate.ci_high is not None:
        text += f" [{estimate.ci_low:.3f}, {estimate.ci_high:.3f}]"
    if name == "f1_tuned" and result.threshold is not None:
        text += f" ({result.threshold:.3f})"
    return text


def _cells(result: MethodResult) -> list[str]:
    return [result.method, f"{result.n_pos} / {result.n_neg}", *(format_cell(result, m, ci) for _, m, ci in COLUMNS)]


def summary_table(results: dict[str, list[MethodResult]]) -> list[dict[str, Any]]:
    """One row per task and method: ``task``, ``method``, ``n_pos``, ``n_neg``, each of ``REPORT_METRICS``
    (None where undefined or missing), ``<metric>_std`` (None without a spread) and ``threshold``."""
    rows = []
    for task, methods in results.items():
        for r in methods:
            row: dict[str, Any] = {"task": task, "method": r.method, "n_pos": r.n_pos, "n_neg": r.n_neg}
            for name in REPORT_METRICS:
                row[name] = _value(r, name)
                row[f"{name}_std"] = r.std.get(name)
            row["threshold"] = r.threshold
            rows.append(row)
    return rows


def _both_classes(r: MethodResult) -> bool:
    return 0 < r.n_pos < len(r.y)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width bin (as ``expected_calibration_error``): mean probability, observed rate, count."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    used = counts > 0
    mean_p = np.bincount(index, weights=p, minlength=bins)[used] / counts[used]
    rate = np.bincount(index, weights=y, minlength=bins)[used] / counts[used]
    return mean_p, rate, counts[used]


def _roc_figure(path: Path, task: str, methods: list[MethodResult]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(5.5, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for r in methods:
        if not _both_classes(r):
            ax.plot([], [], label=f"{r.method} (AUROC {UNDEFINED})")
            continue
        fpr, tpr, _ = roc_curve(r.y, r.p)
        auroc = _value(r, "auroc")
        auroc = metric("auroc", r.y, r.p) if auroc is None else auroc
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{r.method} (AUROC {auroc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC — {task}", aspect="equal")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110)


def _calibration_figure(path: Path, task: str, methods: list[MethodResult]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    top.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfectly calibrated")
    for r in methods:
        if len(r.y) == 0:
            continue
        mean_p, rate, _ = reliability(r.y, r.p)
        ece = _value(r, "ece")
        ece = expected_calibration_error(np.asarray(r.y, float), np.asarray(r.p, float)) if ece is None else ece
        top.plot(mean_p, rate, marker="o", markersize=4, linewidth=1.4, label=f"{r.method} (ECE {ece:.3f})")
    top.set(xlim=(0, 1), ylim=(-0.01, 1.01), ylabel="observed rate", title=f"Calibration — {task}")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    shown = next((r for r in methods if r.method == "model"), methods[0] if methods else None)
    if shown is not None and len(shown.p):
        bottom.hist(np.asarray(shown.p, float), bins=np.linspace(0, 1, 2 * BINS + 1), color="0.45")
        bottom.set_ylabel(f"{shown.method} scores\n(count)", fontsize=8)
    bottom.set_xlabel("mean predicted probability")
    bottom.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def _markdown(title: str, notes: list[str], results: dict[str, list[MethodResult]]) -> str:
    lines = [f"# {title}", ""]
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    for task, methods in results.items():
        lines += [f"## {task}", "", "| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] + ["---:"] * 7) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in methods]
        lines += ["", f"![ROC curves — {task}](roc_{task}.png) ![Calibration — {task}](calibration_{task}.png)", ""]
    lines += [f"_{LEGEND}_", ""]
    return "\n".join(lines)


def _html(title: str, notes: list[str], results: dict[str, list[MethodResult]]) -> str:
    e = html.escape
    parts = ['<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
             f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>", f"<h1>{e(title)}</h1>"]  # fmt: skip
    if notes:
        parts.append("<ul>\n" + "\n".join(f"<li>{e(note)}</li>" for note in notes) + "\n</ul>")
    for task, methods in results.items():
        head = "".join(f"<th>{e(h)}</th>" for h in HEADERS)
        body = "\n".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r)) + "</tr>" for r in methods)
        parts.append(f'<h2 id="{task}">{e(task)}</h2>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n'
                     "</tbody>\n</table>")  # fmt: skip
        figures = [(f"roc_{task}.png", f"ROC curves — {task}"), (f"calibration_{task}.png", f"Calibration — {task}")]
        parts.append('<div class="figures">\n' + "\n".join(
            f'<figure><img src="{name}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
            for name, caption in figures) + "\n</div>")  # fmt: skip
    parts += [f'<p class="legend">{e(LEGEND)}</p>', "</body>\n</html>\n"]
    return "\n".join(parts)


def write_report(folder: Path, title: str, notes: list[str], results: dict[str, list[MethodResult]]) -> dict[str, Path]:
    """Write the report into ``folder`` (created if needed); task names must be ``[a-z0-9_]+``.

    Returns ``{"markdown": report.md, "html": report.html}`` plus every image by its file name.
    """
    for task in results:
        if not TASK_NAME.fullmatch(task):
            raise ValueError(f"task name {task!r} is not a safe file name part: [a-z0-9_]+")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for task, methods in results.items():
        for name, draw in ((f"roc_{task}.png", _roc_figure), (f"calibration_{task}.png", _calibration_figure)):
            draw(folder / name, task, methods)
            written[name] = folder / name
    markdown, page = folder / "report.md", folder / "report.html"
    markdown.write_text(_markdown(title, notes, results), encoding="utf-8")
    page.write_text(_html(title, notes, results), encoding="utf-8")
    return {"markdown": markdown, "html": page, **written}
