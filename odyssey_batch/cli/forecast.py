"""``odyssey-batch forecast`` and ``odyssey-batch evaluate-forecast``: sampled futures from a pretrained EHRMamba.

``register(app)`` adds both commands to the main typer app (``cli/main.py``). Heavy modules (torch, the model)
are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from odyssey_batch.cli.context import open_warehouse, set_threads
from odyssey_batch.cli.output import StageProgress, console, emit_json, err_console, table

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the human summary.")]
RunOption = Annotated[
    int | None,
    typer.Option("--run", help="Pretraining run id (default: the latest succeeded `train pretrain` run)."),
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="CPU threads for torch (default: torch's choice). Generation is one small step per token: 1 thread "
        "is often the fastest on a busy machine.",
    ),
]
SeedOption = Annotated[int, typer.Option(help="Random seed: the same seed, model and data give the same output.")]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_rows(rows, header: bool) -> None:
    width = max((len(r.token) for r in rows), default=10)
    if header:
        print(f"{'date':10}  {'age':>5}  {'visit':>5}  {'p':>6}  {'token':{width}}  meaning")
    for r in rows:
        p = "" if r.probability is None else f"{r.probability:.3f}"
        print(f"{r.date:10}  {r.age:5.1f}  {r.visit:5}  {p:>6}  {r.token:{width}}  {r.meaning}")


def forecast(
    patient_id: Annotated[str, typer.Argument(help="The patient's id (ehr.patient.patient_id).")],
    steps: Annotated[int, typer.Option(min=1, help="How many tokens to generate.")] = 50,
    temperature: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Sampling temperature: 0 always takes the most likely token; 1 samples "
            "the model's own distribution; higher is more adventurous.",
        ),
    ] = 1.0,
    top_p: Annotated[
        float,
        typer.Option(
            "--top-p",
            min=0.0,
            max=1.0,
            help="Nucleus sampling: draw only from the smallest set of "
            "most likely tokens whose probability reaches this (1 = all tokens).",
        ),
    ] = 0.95,
    seed: SeedOption = 0,
    run: RunOption = None,
    history: Annotated[int, typer.Option(min=0, help="How many of the patient's last real tokens to show.")] = 12,
    stop_at_visit_end: Annotated[
        bool, typer.Option("--stop-at-visit-end", help="Stop after the first generated [VE] (one visit).")
    ] = False,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
) -> None:
    """Continue a patient's record with EHRMamba: sample the tokens that may come next.

    The patient's sequence is rebuilt from the warehouse with the vocabulary and lab bins of the pretraining
    run's dataset version (as `show-patient` shows it), cut to the run's window length, encoded once, and then
    continued one recurrent step per token. The output shows the last real tokens, a rule, then the generated
    ones with the model's probability `p` of each.

    How to read it: an interval token (`[W_2]`: 14–20 days, `[M_3]`: 90–119 days, `[LT]`: over a year) moves
    the date forward by the shortest gap it stands for, so generated dates are the earliest possible; `[VS]`
    opens a new visit and everything up to `[VE]` happens at that visit's start. A forecast is one sample of
    what the model finds plausible, not a prediction: run it with several seeds, or see `evaluate-forecast`
    for how often sampled visits contain the real codes.

    Examples: `odyssey-batch forecast PATIENT --steps 30 --temperature 0` (the most likely path);
    `odyssey-batch forecast PATIENT --stop-at-visit-end --seed 3` (one possible next visit).
    """
    from odyssey_batch.forecast.generate import generate
    from odyssey_batch.forecast.render import generated_rows, history_rows, patient_history
    from odyssey_batch.forecast.runs import load_pretrained
    from odyssey_batch.quality.gate import RunRejected
    from odyssey_batch.sequences.tokens import window

    settings, url = open_warehouse()
    set_threads(threads)
    try:
        pretrained = load_pretrained(url, settings, run)
        patient = patient_history(url, pretrained.dataset, patient_id)
    except (LookupError, RunRejected) as exc:
        err_console.print(f"[red]forecast failed:[/] {exc}")
        raise typer.Exit(2) from exc
    streams = patient.streams
    model_input = window(streams, len(streams["token_ids"]), pretrained.max_length)
    generated = generate(
        pretrained.model,
        model_input,
        pretrained.dataset.vocabulary,
        steps=steps,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop_at_visit_end=stop_at_visit_end,
    )
    offset = int(streams["visit_orders"].max()) - int(model_input["visit_orders"].max())
    real = history_rows(patient, history)
    future = generated_rows(generated, patient.displays, pretrained.dataset.bins, offset)
    summary = {
        "pretrain_run": pretrained.run_id,
        "dataset_version": pretrained.dataset.version,
        "history_tokens": len(patient.tokens),
        "model_input_tokens": len(model_input["token_ids"]),
        "steps": steps,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }
    if json_output:
        emit_json({**summary, "history": [r.as_dict() for r in real], "generated": [r.as_dict() for r in future]})
        return
    console.print(
        f"[bold]Forecast of {len(future)} tokens[/] from pretraining run {pretrained.run_id} (dataset version "
        f"{pretrained.dataset.version}); history {len(patient.tokens)} tokens, the model read the last "
        f"{len(model_input['token_ids'])}; temperature {temperature:g}, top-p {top_p:g}, seed {seed}"
    )
    _print_rows(real, header=True)
    console.rule("forecast")
    _print_rows(future, header=not real)
    console.print(
        "[dim]Generated dates are the earliest the interval tokens allow; a generated visit's events sit at its "
        "start.[/]"
    )


def evaluate_forecast(
    run: RunOption = None,
    k: Annotated[str, typer.Option("--k", help="Cut-offs of recall@k, comma-separated.")] = "5,10,20",
    max_patients: Annotated[int, typer.Option(min=1, help="At most this many test patients (by patient id).")] = 200,
    samples: Annotated[int, typer.Option(min=1, help="Sampled continuations per patient.")] = 10,
    seed: SeedOption = 0,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
) -> None:
    """Measure how well sampled futures predict a patient's next visit: recall@k, model vs a simple baseline.

    For test-split patients with at least two visits, the history is cut where the last visit begins; the
    question is which codes (diagnoses, procedures, medications, lab tests; a lab's value bin ignored) that
    visit will contain. The **model** samples `--samples` continuations of the visit (until `[VE]`) and ranks
    codes by how many samples contain them (ties by the model's first-event probability). The **baseline**
    ranks the patient's own past codes by frequency (ties by recency): a strong rival, as patients repeat.
    recall@k = share of the visit's codes among the top k, averaged over patients.

    Beating the baseline means the model predicts more than "what this patient usually has"; a large gap at
    small k with a short pretraining run is expected. The same run and seed give the same numbers.
    """
    from odyssey_batch.forecast.evaluate import evaluate_forecast as run_evaluation

    try:
        cutoffs = tuple(int(part) for part in k.split(",") if part.strip())
        if not cutoffs or min(cutoffs) < 1:
            raise ValueError
    except ValueError as exc:
        err_console.print(f"[red]evaluate-forecast failed:[/] --k must be positive integers like 5,10,20 (got {k!r})")
        raise typer.Exit(2) from exc
    settings, url = open_warehouse()
    set_threads(threads)
    try:
        with StageProgress(not json_output) as bar:
            result = run_evaluation(
                url,
                settings,
                run,
                k=cutoffs,
                max_patients=max_patients,
                samples=samples,
                seed=seed,
                progress=lambda done, total: bar.update("test patients", done, total),
            )
    except LookupError as exc:
        err_console.print(f"[red]evaluate-forecast failed:[/] {exc}")
        raise typer.Exit(2) from exc
    if json_output:
        emit_json(result)
        return
    columns = ["ranking", *(f"recall@{c}" for c in result["k"])]
    rows = [
        [name, *(_fmt(result[key][f"recall@{c}"]) for c in result["k"])]
        for name, key in (("model (sampled visits)", "model"), ("baseline (own past codes)", "baseline"))
    ]
    title = (
        f"Next-visit recall, pretraining run {result['pretrain_run']} (dataset version {result['dataset_version']}): "
        f"{result['patients']} test patients, {result['samples']} samples each"
    )
    console.print(table(title, columns, rows))
    skipped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in result["skipped"].items() if n)
    console.print(f"{result['seconds']:.1f} s" + (f"; skipped: {skipped}" if skipped else ""))


def register(app: typer.Typer) -> None:
    """Add ``forecast`` and ``evaluate-forecast`` to ``app``."""
    app.command("forecast")(forecast)
    app.command("evaluate-forecast")(evaluate_forecast)
