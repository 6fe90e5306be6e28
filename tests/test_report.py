"""The evaluation report on synthetic predictions: files, images, tables and the HTML page."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest

from odyssey_batch.evaluation.metrics import Estimate, evaluate_task
from odyssey_batch.evaluation.report import MethodResult, reliability, summary_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ("mortality_30d", "readmission_30d")
METHODS = ("model", "logreg", "gbt")


def results() -> dict[str, list[MethodResult]]:
    rng = np.random.default_rng(0)
    out = {}
    for t, task in enumerate(TASKS):
        y = (rng.random(300) < 0.2 + 0.1 * t).astype(float)
        methods = []
        for strength, method in zip((2.5, 1.5, 1.0), METHODS, strict=True):
            p = 1 / (1 + np.exp(-(strength * (y - 0.5) + rng.normal(0, 1, 300))))
            metrics = evaluate_task(y, p, resamples=50)
            metrics["f1_tuned"] = Estimate(0.6, None, None)
            std = {"auroc": 0.0123} if method == "gbt" else {}
            methods.append(MethodResult(method, y, p, metrics, threshold=0.35, std=std))
        out[task] = methods
    # a method whose metrics are undefined or missing: one class only, and no F1@thr
    one_class, constant = np.zeros(50), np.full(50, 0.1)
    metrics = evaluate_task(one_class, constant, resamples=20)
    del metrics["f1_tuned"]
    out[TASKS[1]].append(MethodResult("oracle", one_class, constant, metrics))
    return out


class Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_report_writes_images_markdown_and_html(tmp_path):
    data = results()
    written = write_report(tmp_path / "out", "Evaluation of run 7", ["dataset version 3", "test split"], data)
    names = {f"{kind}_{task}.png" for kind in ("roc", "calibration") for task in TASKS}
    assert set(written) == {"markdown", "html", *names}
    for name in names:
        path = written[name]
        assert path == tmp_path / "out" / name and path.read_bytes()[:8] == PNG_SIGNATURE
        import matplotlib.image

        height, width = matplotlib.image.imread(path).shape[:2]
        assert 300 <= width <= 2000 and 300 <= height <= 2000

    markdown = written["markdown"].read_text()
    assert markdown.startswith("# Evaluation of run 7") and "- dataset version 3" in markdown
    for task, methods in data.items():
        assert f"## {task}" in markdown and f"(roc_{task}.png)" in markdown and f"(calibration_{task}.png)" in markdown
        for r in methods:
            assert f"| {r.method} | {r.n_pos} / {r.n_neg} |" in markdown
            if r.metrics["auroc"].value is not None:
                assert f"{r.metrics['auroc'].value:.3f}" in markdown
    gbt = data[TASKS[0]][2]
    assert f"{gbt.metrics['auroc'].value:.3f} ± 0.012 [" in markdown  # mean ± std, then the interval
    assert "0.600 (0.350)" in markdown  # F1 at the validation threshold
    oracle_row = next(line for line in markdown.splitlines() if line.startswith("| oracle |"))
    cells = [c.strip() for c in oracle_row.strip("|").split("|")]
    assert cells[1] == "0 / 50" and cells[2] == cells[3] == cells[5] == "—"  # AUROC, AUPRC undefined; no F1@thr
    assert cells[4] == "0.000" and cells[6] == "0.010"  # F1@0.5, Brier

    page = written["html"].read_text()
    parser = Collector()
    parser.feed(page)
    parser.close()
    assert {"html", "head", "style", "body", "table", "th", "td", "img"} <= set(parser.tags)
    assert parser.tags.count("table") == len(TASKS)
    assert sorted(parser.images) == sorted(names)
    for task in TASKS:
        assert f'<img src="roc_{task}.png"' in page
    assert "&lt;" not in page and "Evaluation of run 7" in page


def test_summary_table_rows():
    data = results()
    rows = summary_table(data)
    assert [(r["task"], r["method"]) for r in rows] == [(t, m.method) for t in TASKS for m in data[t]]
    first = rows[0]
    assert first["n_pos"] + first["n_neg"] == 300 and first["auroc"] == data[TASKS[0]][0].metrics["auroc"].value
    assert first["threshold"] == 0.35 and first["f1_tuned"] == 0.6 and first["auroc_std"] is None
    assert rows[2]["auroc_std"] == 0.0123
    assert rows[-1]["auroc"] is None and rows[-1]["f1_tuned"] is None


def test_unsafe_task_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="safe file name"):
        write_report(tmp_path, "t", [], {"../x": []})


def test_reliability_bins_match_the_calibration_error():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.05, 0.15, 0.12, 0.95, 1.0])
    mean_p, rate, counts = reliability(y, p)
    np.testing.assert_allclose(mean_p, [0.05, 0.135, 0.975])
    np.testing.assert_allclose(rate, [0, 0.5, 1])
    assert counts.tolist() == [1, 2, 2]
