"""``odyssey-batch``: every stage of the pipeline as a command.

Each command prints a short human summary, or a JSON object with ``--json``. Long work shows a progress bar
on stderr. Configuration comes from ``ODYSSEY_*`` environment variables or ``$ODYSSEY_HOME/odyssey.toml``.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from odyssey_batch import __version__
from odyssey_batch.cli.context import cli_settings, open_warehouse, set_threads
from odyssey_batch.cli.output import (
    IngestProgress,
    StageProgress,
    TrainProgress,
    console,
    emit_json,
    err_console,
    table,
)
from odyssey_batch.settings import Settings

app = typer.Typer(
    name="odyssey-batch",
    help=(
        "Hospital batch pipeline: FHIR R4 exports -> Postgres warehouse -> EHRMamba -> nightly risk scores.\n\n"
        "Without ODYSSEY_DATABASE_URL every command uses a private embedded Postgres server under "
        "ODYSSEY_HOME (default ~/.odyssey). Start with `odyssey-batch demo`."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="The warehouse: where it is, its schema, the embedded server.", no_args_is_help=True)
app.add_typer(db_app, name="db")
train_app = typer.Typer(
    help="Train EHRMamba on a dataset version: `pretrain` (next-token prediction), then `finetune` (all tasks).",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")

JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the human summary.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"odyssey-batch {__version__}")
        raise typer.Exit()


_show_traceback = False


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    traceback: Annotated[
        bool, typer.Option("--traceback", help="On an unexpected error, show its (redacted) traceback.")
    ] = False,
) -> None:
    global _show_traceback
    _show_traceback = traceback


# --------------------------------------------------------------------------------------------------- db
@db_app.command("url")
def db_url() -> None:
    """Print the libpq URL of the warehouse in use (starting the embedded server if needed).

    Use it with psql: `psql "$(odyssey-batch db url)"`. This is the one command that prints the password of the
    configured URL (every other output hides it).
    """
    from odyssey_batch.warehouse import database_url

    print(database_url(cli_settings()))


@db_app.command("upgrade")
def db_upgrade(json_output: JsonOption = False) -> None:
    """Apply the schema migrations in `sql/` that the warehouse does not have yet (safe to run twice)."""
    import psycopg2

    from odyssey_batch.warehouse import applied_migrations, database_url, redact, upgrade

    url = database_url(cli_settings())
    try:
        done = upgrade(url)
    except psycopg2.errors.InsufficientPrivilege as exc:
        err_console.print(f"[red]db upgrade failed:[/] {escape(str(exc).strip())}: migrations must run as the "
                          "warehouse's owner (a login in odyssey_pipeline can only check the schema)")  # fmt: skip
        raise typer.Exit(1) from exc
    applied = applied_migrations(url)
    if json_output:
        emit_json({"applied_now": [m.version for m in done], "schema_version": max(applied, default=0)})
        return
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in done) or "nothing (already up to date)"
    console.print(f"Applied {names}. Schema version {max(applied, default=0)} at {redact(url)}.")


@db_app.command("start")
def db_start() -> None:
    """Start the embedded Postgres server (when a database URL is configured: check that it answers)."""
    from odyssey_batch.warehouse import connect, database_url, redact

    settings = cli_settings()
    url = database_url(settings)
    connect(url).close()
    where = "configured server" if not settings.embedded else "embedded server"
    console.print(f"Warehouse ({where}) is up: {redact(url)}")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded Postgres server cleanly. Its data stays under ODYSSEY_HOME/postgres."""
    from odyssey_batch.warehouse import embedded

    stopped = embedded.stop(cli_settings())
    console.print("Embedded server stopped." if stopped else "Embedded server was not running.")


@db_app.command("status")
def db_status(json_output: JsonOption = False) -> None:
    """Show which warehouse is configured and whether the embedded server runs."""
    from odyssey_batch.warehouse import embedded, redact

    settings = cli_settings()
    state = embedded.status(settings)
    data: dict[str, Any] = {
        "mode": "embedded" if settings.embedded else "external",
        "database_url": redact(settings.database_url) if settings.database_url else state.url,
        "embedded_data_dir": str(state.data_dir),
        "embedded_initialized": state.initialized,
        "embedded_running": state.running,
    }
    if json_output:
        emit_json(data)
        return
    for key, value in data.items():
        console.print(f"{key:22} {value}")


# ----------------------------------------------------------------------------------------------- ingest
def _excluded_text(reasons: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n:,}" for reason, n in reasons.items())


def _print_ingest_summary(result: dict[str, Any]) -> None:
    rows = [
        [t, c["records"], c["normalized"], c["excluded"], _excluded_text(c["excluded_reasons"]), c["unchanged"],
         c["quarantined"]]
        for t, c in sorted(result.get("by_type", {}).items())
    ]  # fmt: skip
    console.print(table(f"Ingest run {result['run_id']}: {result['source']}",
                        ["resource type", "read", "normalized", "excluded", "excluded because", "unchanged",
                         "quarantined"], rows))  # fmt: skip
    console.print(
        f"\n[bold]{result['records']:,}[/] resources read = [green]{result['loaded']:,} loaded[/] "
        f"([green]{result['normalized']:,} normalized[/] + {result['excluded']:,} excluded; "
        f"{result['inserted']:,} new, {result['updated']:,} updated) + {result['unchanged']:,} unchanged + "
        f"[{'red' if result['quarantined'] else 'green'}]{result['quarantined']:,} quarantined[/]"
        f" in {result['seconds']:.1f} s ({result['resources_per_s']:,.0f} resources/s)."
    )
    if result.get("source_profile"):
        console.print(f"Source profile: {result['source_profile']}")
    if result.get("excluded_reasons"):
        console.print(
            f"Excluded (kept raw in fhir.resource, no ehr.* row): {_excluded_text(result['excluded_reasons'])} "
            "(not-modelled: a type with no ehr table)."
        )
    if result.get("quarantine_reasons"):
        reasons = ", ".join(f"{k} {v:,}" for k, v in result["quarantine_reasons"].items())
        console.print(f"Quarantine reasons: {reasons}. Inspect: odyssey-batch quarantine --run-id {result['run_id']}")
    if result.get("manifest_mismatches"):
        for m in result["manifest_mismatches"]:
            console.print(f"[yellow]manifest count mismatch:[/] {m['file']}: manifest says {m['manifest_count']:,}, "
                          f"read {m['records']:,}")  # fmt: skip
    written = result.get("rows_written", {})
    if written:
        console.print("Normalized rows written: " + ", ".join(f"ehr.{k} {v:,}" for k, v in written.items()))
    if result.get("unresolved_encounter_refs"):
        console.print(
            f"[yellow]{result['unresolved_encounter_refs']:,} encounter references that resolve nowhere (cleared)[/]"
        )


@app.command()
def ingest(
    source: Annotated[str, typer.Argument(help="Export folder, single file, or s3://bucket/prefix.")],
    workers: Annotated[int, typer.Option(help="Validation worker processes (0 = one per CPU core).")] = -1,
    chunk_lines: Annotated[int, typer.Option(help="NDJSON lines per unit of work (bounds memory).")] = 0,
    profile: Annotated[
        str,
        typer.Option(
            help="Source profile: generic, mimic-iv or a TOML file's path (default: "
            "ODYSSEY_SOURCE_PROFILE, else detected from meta.profile)."
        ),
    ] = "",
    json_output: JsonOption = False,
) -> None:
    """Load a FHIR R4 export into the warehouse.

    Reads Bulk Data NDJSON (`Patient.ndjson`, `Patient.000.ndjson.gz`, with or without `manifest.json`) and
    Bundles (`*.json[.gz]`). Every resource is validated with fhir.resources; failures go to
    `ops.quarantine` with file, line and reason while the rest loads. The run becomes visible in one
    transaction; running the same export again changes nothing.
    """
    from rich.markup import escape

    from odyssey_batch.ingest import ingest as run_ingest
    from odyssey_batch.ingest.discover import ManifestError
    from odyssey_batch.storage.location import printable_name

    settings, url = open_warehouse()
    overrides: dict[str, Any] = {}
    if workers >= 0:
        overrides["ingest_workers"] = workers
    if chunk_lines > 0:
        overrides["ingest_chunk_lines"] = chunk_lines
    if profile:
        overrides["source_profile"] = profile
    settings = settings.with_overrides(**overrides)
    try:
        with IngestProgress(enabled=not json_output) as progress:
            result = run_ingest(source, settings, url=url, progress=progress)
    except (OSError, ManifestError, ValueError) as exc:
        # One line, whatever the message holds (file names, brackets): no markup, no wrapping.
        message = printable_name(" ".join(str(exc).split()))
        err_console.print(f"[red]ingest failed:[/] {escape(message)}", soft_wrap=True)
        raise typer.Exit(1) from exc
    data = result.as_dict()
    if json_output:
        emit_json(data)
    else:
        _print_ingest_summary(data)


@app.command()
def runs(
    limit: Annotated[int, typer.Option(help="How many recent runs to show.")] = 10,
    json_output: JsonOption = False,
) -> None:
    """List recent ingest runs with their status and reconciled counts."""
    from odyssey_batch.warehouse import connect

    _, url = open_warehouse()
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """SELECT run_id, source, status, started_at, finished_at, counts, error
                   FROM ops.ingest_run ORDER BY run_id DESC LIMIT %s""",
                (limit,),
            )
            rows = cur.fetchall()
    finally:
        conn.close()
    data = [
        {
            "run_id": r[0],
            "source": r[1],
            "status": r[2],
            "started_at": r[3],
            "finished_at": r[4],
            **{k: r[5].get(k) for k in ("records", "loaded", "normalized", "excluded", "unchanged", "quarantined")},
            "excluded_reasons": r[5].get("excluded_reasons"),
            "error": r[6],
        }
        for r in rows
    ]
    if json_output:
        emit_json(data)
        return
    columns = ["run", "status", "started", "read", "normalized", "excluded", "unchanged", "quarantined",
               "excluded because", "source"]  # fmt: skip
    rendered = [
        [d["run_id"], d["status"], f"{d['started_at']:%Y-%m-%d %H:%M}"]
        + [d[k] or 0 for k in ("records", "normalized", "excluded", "unchanged", "quarantined")]
        + [_excluded_text(d["excluded_reasons"] or {}), d["source"]]
        for d in data
    ]
    console.print(table("Ingest runs", columns, rendered))


@app.command()
def quarantine(
    run_id: Annotated[int | None, typer.Option(help="Run to inspect (default: the latest run).")] = None,
    examples: Annotated[int, typer.Option(help="Example rows to show per reason.")] = 3,
    show_ids: Annotated[
        bool, typer.Option("--show-ids", help="Show resource ids and references (masked as *** by default).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Summarize what a run quarantined: counts per reason, with file, line and message examples.

    Resource ids (which may be medical record numbers) and the references in the messages are masked unless
    `--show-ids` is given. The original text of every quarantined line is in `ops.quarantine.raw_text` (and
    `raw_bytes` when it was not valid UTF-8).
    """
    from odyssey_batch.redaction import MASK, mask_ids
    from odyssey_batch.warehouse import connect

    _, url = open_warehouse()
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            if run_id is None:
                cur.execute("SELECT max(run_id) FROM ops.ingest_run")
                run_id = cur.fetchone()[0]
            cur.execute(
                """SELECT reason, kind, count(*),
                          (array_agg(jsonb_build_object('source', source, 'line_no', line_no, 'error', error,
                                                        'resource_type', resource_type, 'resource_id', resource_id)
                                     ORDER BY source, line_no))[1:%s]
                   FROM ops.quarantine WHERE run_id = %s GROUP BY reason, kind ORDER BY 3 DESC""",
                (examples, run_id),
            )
            rows = cur.fetchall()
    finally:
        conn.close()
    if not show_ids:
        for row in rows:
            for ex in row[3]:
                ex["error"] = mask_ids(ex["error"], [ex["resource_id"]])
                ex["resource_id"] = MASK if ex["resource_id"] else None
    data = {
        "run_id": run_id,
        "ids_shown": show_ids,
        "reasons": [{"reason": r[0], "kind": r[1], "count": r[2], "examples": r[3]} for r in rows],
    }
    if json_output:
        emit_json(data)
        return
    if not rows:
        console.print(f"Run {run_id} quarantined nothing.")
        return
    for item in data["reasons"]:
        console.print(f"[bold]{item['reason']}[/] ({item['kind']}): {item['count']:,}")
        for ex in item["examples"]:
            line = f":{ex['line_no']}" if ex["line_no"] is not None else ""
            what = f"{ex['resource_type']}/{ex['resource_id']}  " if ex["resource_id"] else ""
            console.print(f"    {ex['source']}{line}  {what}{escape(ex['error'])}", highlight=False)


# --------------------------------------------------------------------------------------------- validate
@app.command()
def validate(
    run_id: Annotated[
        int | None,
        typer.Option(help="Validate the rows this run wrote (default: the whole warehouse, for the latest run)."),
    ] = None,
    docs: Annotated[bool, typer.Option(help="Write the Great Expectations Data Docs site.")] = True,
    json_output: JsonOption = False,
) -> None:
    """Run the data-quality gate (Great Expectations) on the warehouse, store the results, judge the run.

    Checks identity, references, times, codes, lab units and values, volumes against the Bulk Data manifest and
    the previous check, and the quarantine rate. Results go to `ops.dq_result`, the Data Docs site to the
    object store. Any failed *critical* expectation marks the run `rejected` and exits with status 1; later
    stages refuse a rejected run unless accepted (`odyssey-batch accept-run`).
    """
    from odyssey_batch.quality.gate import validate as run_validate

    settings, url = open_warehouse()
    if not json_output:
        err_console.print("Validating with Great Expectations ...")
    try:
        verdict = run_validate(url, settings, run_id, data_docs=docs)
    except LookupError as exc:
        err_console.print(f"[red]validate failed:[/] {exc}")
        raise typer.Exit(2) from exc
    if json_output:
        emit_json(verdict.as_dict())
    else:
        console.print(verdict.message())
        console.print(f"{verdict.rows_checked:,} rows in {verdict.seconds:.1f} s. Results: ops.dq_result "
                      f"(check {verdict.check_id}).")  # fmt: skip
        if verdict.data_docs:
            console.print(f"Data Docs: {verdict.data_docs}")
    if not verdict.success:
        raise typer.Exit(1)


@app.command("accept-run")
def accept_run(
    run_id: Annotated[int, typer.Argument(help="The rejected ingest run to accept.")],
    reason: Annotated[str, typer.Option(help="Why building on this run is acceptable (recorded).")],
    by: Annotated[str | None, typer.Option(help="Who decides (default: the current user).")] = None,
) -> None:
    """Accept a run the data-quality gate rejected, so later stages may build on it. Recorded with who and when."""
    from odyssey_batch.quality.gate import accept_run as record_acceptance

    _, url = open_warehouse()
    try:
        who = record_acceptance(url, run_id, reason, by)
    except (LookupError, ValueError) as exc:
        err_console.print(f"[red]accept-run failed:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"Run {run_id} accepted by {who}.")


# ------------------------------------------------------------------------------------------------ synth
def _print_tokenize_summary(data: dict[str, Any]) -> None:
    patients = data["patients"]
    console.print(
        f"Dataset version [bold]{data['dataset_version_id']}[/]: {sum(patients.values()):,} patients "
        f"(train {patients['train']:,}, validation {patients['validation']:,}, test {patients['test']:,}), "
        f"{data['visits']:,} visits, {data['events']:,} events, {data['tokens']:,} tokens, "
        f"vocabulary {data['vocab_size']:,} tokens, in {data['seconds']:.1f} s."
    )
    if data.get("events_by_type"):
        by_type = ", ".join(f"{k} {v:,}" for k, v in data["events_by_type"].items())
        console.print(f"Events per token type: {by_type} (source profile {data.get('source_profile', 'generic')}).")
    rates = ", ".join(f"{k} {v:.2%}" for k, v in data["unknown_rate"].items())
    console.print(f"Event tokens not in the vocabulary ([UNK]) per split: {rates}.")
    if data["dropped"]:
        console.print(
            "Left out of sequences, per reason: "
            + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in data["dropped"].items())
        )
    else:
        console.print("Left out of sequences: nothing.")
    excluded = data.get("excluded") or {}
    if excluded.get("patients") or excluded.get("records"):
        per_type = ", ".join(f"{k} {v:,}" for k, v in excluded.items() if k not in ("patients", "records"))
        detail = f" ({per_type})" if per_type else ""
        console.print(f"Excluded by the data-quality gate (ops.dq_exclusion_current): {excluded['patients']:,} "
                      f"patients, {excluded['records']:,} records{detail}.")  # fmt: skip
    rows = [[t, c["points"], c["positive"], c["negative"], c["censored"],
             f"{c['positive'] / (c['positive'] + c['negative']):.1%}" if c["positive"] + c["negative"] else "-"]
            for t, c in data["labels"].items()]  # fmt: skip
    console.print(table(f"Labels (ehr.task_label), data until {data['data_end'][:10]}",
                        ["task", "points", "positive", "negative", "censored", "prevalence"], rows))  # fmt: skip
    console.print(f"Manifest: {data['location']}")


@app.command()
def tokenize(
    max_length: Annotated[
        int | None, typer.Option(help="Longest model input in tokens (default ODYSSEY_MAX_LENGTH, 2048).")
    ] = None,
    min_count: Annotated[
        int | None, typer.Option(help="Training occurrences a code needs for its own token (default 5).")
    ] = None,
    lab_bins: Annotated[int | None, typer.Option(help="Quantile bins per lab code (default 5).")] = None,
    accept_run: Annotated[
        list[int] | None,
        typer.Option("--accept-run", help="Build on this rejected ingest run anyway (recorded; repeatable)."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Turn the validated warehouse into EHRMamba token sequences and clinical task labels.

    Builds a new dataset version: one sequence per patient (`[CLS] [VS] events [VE] [REG] <interval> [VS] ...`
    with six side streams), lab values binned per code and a vocabulary, both fitted on the training split only,
    splits by a stable hash of the patient id, and the labels of every task in the registry
    (`ODYSSEY_TASKS_FILE`, default: mortality_30d, los_7d, readmission_30d, hypertension_1y,
    fluid_electrolyte_1y, lipid_disorder_1y). Parquet shards and a manifest go to the object store under
    `datasets/v<N>/`; `ops.dataset_version` records the version and `ehr.task_label` gets its labels.

    Refuses to run while an ingest run is rejected by the data-quality gate or not yet validated.
    """
    from odyssey_batch.quality.gate import RunRejected
    from odyssey_batch.sequences.dataset import TokenizeOptions
    from odyssey_batch.sequences.dataset import tokenize as run_tokenize

    settings, url = open_warehouse()
    options = TokenizeOptions.from_settings(settings, max_length=max_length, min_count=min_count, lab_bins=lab_bins)
    try:
        with StageProgress(enabled=not json_output) as progress:
            result = run_tokenize(url, settings, options, accept=set(accept_run or ()), progress=progress.update)
    except RunRejected as exc:
        err_console.print(f"[red]tokenize refused:[/] {exc}")
        raise typer.Exit(1) from exc
    except (LookupError, ValueError) as exc:
        err_console.print(f"[red]tokenize failed:[/] {exc}")
        raise typer.Exit(2) from exc
    if json_output:
        emit_json(result.as_dict())
    else:
        _print_tokenize_summary(result.as_dict())


@app.command("show-patient")
def show_patient(
    patient_id: Annotated[str, typer.Argument(help="The patient's id (ehr.patient.patient_id).")],
    dataset: Annotated[int | None, typer.Option(help="Dataset version (default: the latest ready one).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Print one patient's timeline and tokens side by side: time, age, visit, token, and what it means.

    Uses the vocabulary and lab bins of a dataset version; labs show their value, unit and bin (very low, low,
    normal, high, very high: the quintiles of the training split). Codes outside the vocabulary are marked.
    """
    from odyssey_batch.sequences.store import open_dataset
    from odyssey_batch.sequences.view import patient_view

    settings, url = open_warehouse()
    try:
        rows, summary = patient_view(url, open_dataset(url, settings, dataset), patient_id)
    except LookupError as exc:
        err_console.print(f"[red]show-patient failed:[/] {exc}")
        raise typer.Exit(2) from exc
    if json_output:
        emit_json({**summary, "tokens": [r.__dict__ for r in rows]})
        return
    console.print(
        f"[bold]{summary['visits']} visits, {summary['tokens']} tokens[/] (vocabulary and lab bins of dataset "
        f"version {summary['dataset_version']})"
    )
    width = max((len(r.token) for r in rows), default=10)
    print(f"{'time':16}  {'age':>5}  {'visit':>5}  {'id':>6}  {'token':{width}}  meaning")
    for r in rows:
        print(f"{r.time:16}  {r.age:5.1f}  {r.visit:5}  {r.token_id:6}  {r.token:{width}}  {r.meaning}")
    if summary["dropped"]:
        console.print("Left out: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["dropped"].items()))


@train_app.command("pretrain")
def train_pretrain(
    dataset: Annotated[int | None, typer.Option(help="Dataset version (default: the latest ready one).")] = None,
    preset: Annotated[str, typer.Option(help="Model size: tiny (tests), small (CPU), paper (GPU).")] = "small",
    max_length: Annotated[int | None, typer.Option(help="Tokens per training window (default 2048).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per batch (grouped by length).")] = 8,
    epochs: Annotated[float, typer.Option(help="Passes over the training windows.")] = 1.0,
    steps: Annotated[int, typer.Option(help="Optimizer steps (overrides --epochs when set).")] = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW; 10% warm-up, linear decay).")] = 5e-4,
    seed: Annotated[int, typer.Option(help="Seed: weights, batch order, dropout.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 200,
    resume: Annotated[
        int | None, typer.Option(help="Continue this training run from its last checkpoint (same options).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Pretrain EHRMamba by next-token prediction on the training split of a dataset version.

    Every window of up to --max-length tokens of every training sequence is an example; [PAD] targets are
    masked. Uses mamba-ssm's CUDA kernels on a GPU (bf16 autocast) and a fast PyTorch scan on CPU; under
    `torchrun --nproc-per-node N` the batches are shared by N processes (DistributedDataParallel).
    Checkpoints (safetensors) go to the object store under `training/run-<id>/`; a killed run continues with
    `--resume <id>`. The run is recorded in `ops.training_run`.
    """

    from odyssey_batch.training.pretrain import PretrainOptions, pretrain

    settings, url = open_warehouse()
    set_threads(threads)
    options = PretrainOptions(
        preset=preset, max_length=max_length or settings.max_length, batch_size=batch_size, epochs=epochs,
        steps=steps, lr=lr, seed=seed, checkpoint_every=checkpoint_every,
    )  # fmt: skip
    with TrainProgress(enabled=not json_output) as progress:
        try:
            result = pretrain(url, settings, dataset, options, resume=resume, progress=progress.update)
        except (LookupError, ValueError) as exc:
            err_console.print(f"[red]pretrain failed:[/] {exc}")
            raise typer.Exit(2) from exc
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, process 0 reports
    if json_output:
        emit_json(result.as_dict())
        return
    val = f"{result.val_loss:.3f}" if result.val_loss is not None else "-"
    console.print(
        f"Training run [bold]{result.training_run_id}[/]: {result.steps:,} steps, {result.tokens:,} tokens, "
        f"{result.tokens_per_s:,.0f} tokens/s on {result.device} (scan backend {result.backend}), "
        f"{result.parameters:,} parameters.\nLoss: train {result.train_loss:.3f}, validation {val}.\n"
        f"Checkpoint: {result.artifact_uri}"
    )


@train_app.command("finetune")
def train_finetune(
    from_run: Annotated[
        int | None, typer.Option("--from", help="The pretraining run (ops.training_run) to start from.")
    ] = None,
    tasks: Annotated[str, typer.Option(help="`all`, or task names separated by commas.")] = "all",
    max_length: Annotated[int | None, typer.Option(help="Tokens per input, the task token included.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prediction points per batch (grouped by length).")] = 16,
    epochs: Annotated[int, typer.Option(help="Most passes over the training points (early stopping).")] = 3,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-4,
    balance: Annotated[str, typer.Option(help="`tasks`: every task weighs the same; `none`: every point.")] = "tasks",
    patience: Annotated[int, typer.Option(help="Epochs without a better validation loss before stopping.")] = 2,
    placement: Annotated[
        str, typer.Option(help="Task token `append`ed after the history, or `replace` [CLS] and the last [REG].")
    ] = "append",
    calibration: Annotated[
        str, typer.Option(help="Per-task calibrator fitted on validation: platt, or isotonic (ties scores).")
    ] = "platt",
    single_task: Annotated[
        bool, typer.Option("--single-task", help="The ablation: one model per task instead of one for all.")
    ] = False,
    register: Annotated[
        bool, typer.Option(help="Register the model as a candidate model version (ops.model_version).")
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed: head weights, batch order, dropout.")] = 0,
    resume: Annotated[
        int | None, typer.Option(help="Continue this finetuning run from its last epoch checkpoint (same options).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Multitask prompted finetuning: one model for every clinical task of the dataset version.

    Each labelled prediction point of `ehr.task_label` becomes an input: the patient's tokens known at the
    prediction time and the task's token `[TASK:<name>]` (appended, so scoring encodes a history once and takes
    one recurrent step per task; or `--placement replace`, the reference design's). One shared head reads the last
    token. Validation loss after each epoch keeps the best epoch; calibrators and F1 thresholds per task are fitted
    on validation; the run is recorded in `ops.training_run` and the model registered as a candidate in
    `ops.model_version` (then `odyssey-batch evaluate <version>`). `--single-task` trains the ablation instead:
    one run per task, not registered, which `evaluate` puts beside the multitask model.
    """

    from odyssey_batch.training.finetune import FinetuneOptions, finetune

    settings, url = open_warehouse()
    set_threads(threads)
    if from_run is None and resume is None:
        err_console.print("[red]finetune failed:[/] give --from <pretraining run> (or --resume <finetuning run>)")
        raise typer.Exit(2)
    chosen = () if tasks.strip() == "all" else tuple(t.strip() for t in tasks.split(",") if t.strip())
    options = FinetuneOptions(
        tasks=chosen, max_length=max_length or settings.max_length, batch_size=batch_size, epochs=epochs, lr=lr,
        balance=balance, patience=patience, seed=seed, placement=placement, calibration=calibration,
    )  # fmt: skip
    results = []
    try:
        if single_task:
            from odyssey_batch.training.finetune import dataset_tasks

            for task in chosen or dataset_tasks(url, settings, from_run):
                with TrainProgress(enabled=not json_output) as progress:
                    one = FinetuneOptions(**{**options.__dict__, "tasks": (task,)})
                    results.append(finetune(url, settings, from_run, one, progress=progress.update))
        else:
            with TrainProgress(enabled=not json_output) as progress:
                results.append(finetune(url, settings, from_run, options, resume=resume, progress=progress.update))
    except (LookupError, ValueError) as exc:
        err_console.print(f"[red]finetune failed:[/] {exc}")
        raise typer.Exit(2) from exc
    data = [r.as_dict() for r in results]
    if register and not single_task:
        from odyssey_batch.registry.bundle import register_run

        data[0]["model_version"] = register_run(url, settings, results[0].training_run_id).model_version
    if json_output:
        emit_json(data if single_task else data[0])
        return
    for result, info in zip(results, data, strict=True):
        rows = [[t, result.points["train"].get(t, 0), result.points["validation"].get(t, 0),
                 "-" if a is None else f"{a:.3f}"] for t, a in result.val_auroc.items()]  # fmt: skip
        title = f"Finetuning run {result.training_run_id} (from pretraining run {result.parent_run_id})"
        console.print(table(title, ["task", "train points", "validation points", "validation AUROC"], rows))
        console.print(
            f"Best epoch {result.best_epoch} of {result.epochs}: validation loss {result.val_loss:.4f}; "
            f"{result.steps:,} steps in {result.seconds:.0f} s on {result.device} (placement {result.placement}).\n"
            f"Checkpoint: {result.artifact_uri}"
        )
        if "model_version" in info:
            console.print(f"Registered as candidate model version [bold]{info['model_version']}[/]: "
                          f"evaluate it with `odyssey-batch evaluate {info['model_version']}`.")  # fmt: skip


# ------------------------------------------------------------------------------------------- evaluation
def _fmt(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:.3f}"


def _print_evaluation(data: dict[str, Any]) -> None:
    rows = [[r["task"], r["method"], f"{r['n_pos']}/{r['n_neg']}", _fmt(r["auroc"]), _fmt(r["auprc"]),
             _fmt(r["f1"]), _fmt(r["f1_tuned"]), _fmt(r["brier"]), _fmt(r["ece"])] for r in data["table"]]  # fmt: skip
    title = f"Model version {data['model_version']} on the test split of dataset version {data['dataset_version']}"
    columns = ["task", "method", "n+/n−", "AUROC", "AUPRC", "F1@0.5", "F1@thr", "Brier", "ECE"]
    console.print(table(title, columns, rows))
    for note in data["notes"]:
        console.print(f"• {note}")
    console.print(f"Report: {data['report'].get('report/report.html', '-')}  ({data['seconds']:.0f} s)")


@app.command()
def evaluate(
    model_version: Annotated[int, typer.Argument(help="The model version (ops.model_version) to evaluate.")],
    baselines: Annotated[str, typer.Option(help="Baselines on the same points: logreg,gbt or `none`.")] = (
        "logreg,gbt"
    ),
    oracle: Annotated[
        Path | None, typer.Option(help="truth.parquet of a synthetic export: adds the true risk as `oracle`.")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Finetuning seeds for mean ± std (extra seeds are trained).")] = 1,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals.")] = 1000,
    promote: Annotated[
        bool, typer.Option("--promote", help="Then apply the promotion rule (`odyssey-batch models promote`).")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Evaluate a model version on the test split of its dataset version, against baselines, on the same points.

    Per task: AUROC, AUPRC, F1 at 0.5 and at the threshold chosen on validation, Brier score, expected
    calibration error, positives and negatives, 95% bootstrap intervals. Beside the model: logistic regression
    and gradient-boosted trees on code counts plus age, the single-task models (`train finetune --single-task`)
    when they exist, the true risk with `--oracle`, and the current champion. Rows go to `ops.model_evaluation`;
    a Markdown/HTML report with ROC and calibration plots is stored with the model (`report/`).
    """

    from odyssey_batch.evaluation.evaluate import EvaluateOptions, evaluate_model

    settings, url = open_warehouse()
    set_threads(threads)
    chosen = () if baselines.strip() in ("", "none") else tuple(b.strip() for b in baselines.split(",") if b.strip())
    options = EvaluateOptions(baselines=chosen, oracle=str(oracle) if oracle else None, seeds=seeds,
                              resamples=resamples)  # fmt: skip
    try:
        result = evaluate_model(url, settings, model_version, options,
                                progress=None if json_output else lambda m: err_console.print(f"… {m}"))  # fmt: skip
    except (LookupError, ValueError) as exc:
        err_console.print(f"[red]evaluate failed:[/] {exc}")
        raise typer.Exit(2) from exc
    data = result.as_dict()
    if promote:
        from odyssey_batch.registry.promotion import promote as apply_rule

        decision = apply_rule(url, model_version, settings.promotion_rule())
        data["promotion"] = {"promoted": decision.promote, "reason": decision.reason}
    if json_output:
        emit_json(data)
        return
    _print_evaluation(data)
    if promote:
        verdict = "[green]promoted to champion[/]" if data["promotion"]["promoted"] else "[yellow]not promoted[/]"
        console.print(f"Model version {model_version} {verdict}: {data['promotion']['reason']}")


models_app = typer.Typer(
    help="The model registry: candidates, the champion that scores nightly, promotion and rollback.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(json_output: JsonOption = False) -> None:
    """Every model version, newest first: status, dataset version, preset, mean test AUROC."""
    from odyssey_batch.registry.versions import list_versions

    _, url = open_warehouse()
    found = list_versions(url)
    data = []
    for v in found:
        aurocs = [m.get("model", {}).get("auroc") for m in (v.metrics.get("test") or {}).values()]
        aurocs = [a for a in aurocs if a is not None]
        data.append({"model_version": v.model_version, "status": v.status, "created_at": v.created_at.isoformat(),
                     "dataset_version": v.dataset_version, "training_run_id": v.training_run_id, "preset": v.preset,
                     "mean_auroc": sum(aurocs) / len(aurocs) if aurocs else None, "reason": v.status_reason,
                     "artifact_uri": v.artifact_uri})  # fmt: skip
    if json_output:
        emit_json({"models": data})
        return
    rows = [[d["model_version"], d["status"], d["created_at"][:19], d["dataset_version"], d["training_run_id"],
             d["preset"], _fmt(d["mean_auroc"]), d["reason"] or ""] for d in data]  # fmt: skip
    columns = ["version", "status", "created", "dataset", "run", "preset", "mean AUROC", "reason"]
    console.print(table("Model versions", columns, rows))


@models_app.command("promote")
def models_promote(
    model_version: Annotated[int, typer.Argument(help="The candidate model version.")],
    force: Annotated[bool, typer.Option("--force", help="Promote without the rule (needs --reason).")] = False,
    reason: Annotated[str, typer.Option(help="Why (recorded in ops.model_promotion).")] = "",
    actor: Annotated[str, typer.Option(help="Who (recorded).")] = os.environ.get("USER", "operator"),
    json_output: JsonOption = False,
) -> None:
    """Make a candidate the champion if the promotion rule allows it (or `--force` it, with a reason).

    The rule compares the candidate with the champion on the candidate's test points (`evaluate` scores both):
    the mean AUROC must not be lower and no task may lose more than `ODYSSEY_PROMOTION_MAX_TASK_DROP`. Every
    decision is recorded in `ops.model_promotion`.
    """
    from odyssey_batch.registry.promotion import force_promote
    from odyssey_batch.registry.promotion import promote as apply_rule

    settings, url = open_warehouse()
    try:
        if force:
            if not reason:
                err_console.print("[red]promote failed:[/] --force needs --reason")
                raise typer.Exit(2)
            force_promote(url, model_version, actor=actor, reason=reason)
            data = {"model_version": model_version, "promoted": True, "reason": reason, "forced": True}
        else:
            decision = apply_rule(url, model_version, settings.promotion_rule(), actor=actor)
            data = {"model_version": model_version, "promoted": decision.promote, "reason": decision.reason,
                    "forced": False}  # fmt: skip
    except (LookupError, ValueError) as exc:
        err_console.print(f"[red]promote failed:[/] {exc}")
        raise typer.Exit(2) from exc
    if json_output:
        emit_json(data)
    else:
        verdict = "[green]is now the champion[/]" if data["promoted"] else "[yellow]stays a candidate[/]"
        console.print(f"Model version {model_version} {verdict}: {data['reason']}")
    if not data["promoted"]:
        raise typer.Exit(1)


@models_app.command("rollback")
def models_rollback(
    reason: Annotated[str, typer.Option(help="Why (recorded in ops.model_promotion).")],
    actor: Annotated[str, typer.Option(help="Who (recorded).")] = os.environ.get("USER", "operator"),
    json_output: JsonOption = False,
) -> None:
    """Retire the champion and bring back the one it replaced (recorded in `ops.model_promotion`)."""
    from odyssey_batch.registry.promotion import rollback

    _, url = open_warehouse()
    try:
        restored = rollback(url, actor=actor, reason=reason)
    except (LookupError, ValueError) as exc:
        err_console.print(f"[red]rollback failed:[/] {exc}")
        raise typer.Exit(2) from exc
    if json_output:
        emit_json({"champion": restored.model_version})
    else:
        console.print(f"Model version [bold]{restored.model_version}[/] is the champion again.")


# ---------------------------------------------------------------------------------------------- scoring
def _parse_as_of(value: str, settings: Settings):
    import datetime as dt
    from zoneinfo import ZoneInfo

    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r} is not an ISO date or time (2026-11-24, 2026-11-24T02:00)") from exc
    if parsed.tzinfo is None:  # a date or a local time: in the hospital's time zone
        parsed = parsed.replace(tzinfo=ZoneInfo(settings.default_timezone))
    return parsed


@app.command()
def score(
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="Scoring time: a date (midnight) or ISO time, in ODYSSEY_DEFAULT_TIMEZONE."),
    ] = None,
    cohort: Annotated[
        str, typer.Option(help="`triggers`: each task's eligible patients; `active`: everyone seen in --active-days.")
    ] = "triggers",
    active_days: Annotated[float, typer.Option(help="Look-back of the `active` cohort, in days.")] = 30.0,
    partitions: Annotated[int, typer.Option(help="Hash partitions of the patients (scored one after another).")] = 1,
    run_id: Annotated[
        int | None, typer.Option(help="Score only --partition of this started run (Airflow's mapped tasks).")
    ] = None,
    partition: Annotated[int | None, typer.Option(help="With --run-id: the partition to score.")] = None,
    commit: Annotated[
        int | None, typer.Option(help="Commit this started run once all its partitions have succeeded.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    json_output: JsonOption = False,
) -> None:
    """Score every eligible patient for every task with the champion model, into `risk.*`, atomically.

    Eligibility comes from the task registry (e.g. discharges of the last day for mortality_30d and
    readmission_30d, stays that reached 24 hours for los_7d, discharges of the last 30 days for the condition
    tasks); inputs are rebuilt as of the scoring time with the model's vocabulary and bins; each patient's history
    is encoded once and every task costs one recurrent step. Scores above the configured band get their top
    contributing events (integrated gradients). Analysts see the run only once all of it is written; scoring the
    same date again replaces it in one transaction. Read it with
    `SELECT * FROM risk.latest_score` or `risk.patient_risk` or `risk.high_risk_today`.
    """

    from odyssey_batch.scoring import run as scoring

    settings, url = open_warehouse()
    set_threads(threads)
    options = scoring.ScoreOptions(cohort=cohort, active_days=active_days, partitions=partitions)
    try:
        if run_id is not None:
            if partition is None:
                raise ValueError("--run-id needs --partition")
            with StageProgress(enabled=not json_output) as progress:
                emit_json(scoring.score_partition(url, settings, run_id, partition, options, progress=progress.update))
            return
        if commit is not None:
            result = scoring.commit_run(url, settings, commit)
        else:
            if as_of is None:
                raise ValueError("give --as-of (or --run-id with --partition, or --commit)")
            with StageProgress(enabled=not json_output) as progress:
                result = scoring.score(url, settings, _parse_as_of(as_of, settings), options,
                                       progress=progress.update)  # fmt: skip
    except (LookupError, ValueError, RuntimeError) as exc:
        err_console.print(f"[red]score failed:[/] {exc}")
        raise typer.Exit(2) from exc
    data = result.as_dict()
    if json_output:
        emit_json(data)
        return
    rows = []
    for task, bands in data["scores_by_task"].items():
        psi = (data["drift"]["tasks"].get(task) or {}).get("psi")
        rows.append([task, sum(bands.values()), bands.get("high", 0), bands.get("medium", 0), bands.get("low", 0),
                     "-" if psi is None else f"{psi:.3f}"])  # fmt: skip
    title = f"Scoring run {data['run_id']} as of {data['as_of']} (model version {data['model_version']})"
    console.print(table(title, ["task", "scores", "high", "medium", "low", "PSI"], rows))
    console.print(f"{data['n_patients']:,} patients, {data['n_scores']:,} scores, {data['patients_per_s']:.1f} "
                  f"patients/s; unknown-token rate {data['unknown_rate']:.2%}.")  # fmt: skip
    if data["drift_flagged"]:
        console.print("[yellow]Drift flagged:[/] " + "; ".join(data["drift"]["reasons"]))
    if data["held_back_runs"]:
        console.print(f"[yellow]Held back:[/] {data['held_back_patients']:,} patient(s) with data from ingest run(s) "
                      f"{', '.join(map(str, data['held_back_runs']))}, rejected by the quality gate and not accepted "
                      "(or not validated yet): not scored tonight")  # fmt: skip
    if data.get("excluded_patients"):
        console.print(f"[yellow]Excluded:[/] {data['excluded_patients']:,} patient(s) excluded whole by the quality "
                      "gate (ops.dq_exclusion_current): not scored")  # fmt: skip
    console.print('Query it: psql "$(odyssey-batch db url)" -c "SELECT * FROM risk.high_risk_today"')


def _print_synth_summary(data: dict[str, Any]) -> None:
    counts = [[t, n] for t, n in data["counts"].items()]
    console.print(table(f"Synthetic export: {data['out']}", ["resource type", "resources"], counts))
    console.print()
    points = [[t, n, f"{data['prevalence'].get(t, 0):.1%}"] for t, n in data["truth_points"].items()]
    title = "Prediction points in truth.parquet (never read by ingest or training)"
    console.print(table(title, ["task", "points", "label prevalence"], points))
    console.print(f"\n{data['patients']:,} patients, {data['resources']:,} resources in {data['seconds']:.1f} s.")
    late = sum(data["late_counts"].values())
    if late:
        console.print(f"Late-arriving files: {late:,} resources in late/ (ingest them after the main export).")


MESSY_HELP = (
    "Add real-world rough edges: corrected duplicate labs (newer versions), labs in other units, visits "
    "without an end, and late-arriving files (late/, a second export to ingest afterwards)."
)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the export to (created; must be empty).")],
    patients: Annotated[int, typer.Option(min=1, help="How many patients.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same bytes.")] = 0,
    start: Annotated[str, typer.Option(help="First day of the history (YYYY-MM-DD).")] = "2015-01-01",
    end: Annotated[str, typer.Option(help="Export time: nothing happens after it (YYYY-MM-DD).")] = "2026-01-01",
    messy: Annotated[bool, typer.Option(help=MESSY_HELP)] = False,
    workers: Annotated[int, typer.Option(help="Worker processes (0 = one per CPU core).")] = 0,
    json_output: JsonOption = False,
) -> None:
    """Write a synthetic FHIR R4 Bulk Data export whose outcomes follow a known hidden risk model.

    Writes `<Type>.ndjson.gz` files and a Bulk Data `manifest.json` that `odyssey-batch ingest` loads with
    nothing quarantined, plus `truth.parquet`: for every prediction point of the six clinical tasks, the
    probability the generator used and the resulting label (the oracle for evaluation). The risk model is
    documented in `odyssey_batch/synth/risk.py` and the README.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from odyssey_batch.synth import generate

    show = not json_output and err_console.is_terminal
    bar = Progress("[bold]patients", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err_console, transient=True, disable=not show)  # fmt: skip
    with bar:
        task = bar.add_task("patients", total=patients)
        try:
            result = generate(out, patients, seed, start=start, end=end, messy=messy, workers=workers,
                              progress=lambda n: bar.advance(task, n))  # fmt: skip
        except (ValueError, FileExistsError) as exc:
            err_console.print(f"[red]synth failed:[/] {exc}")
            raise typer.Exit(1) from exc
    data = result.as_dict()
    if json_output:
        emit_json(data)
    else:
        _print_synth_summary(data)


# ------------------------------------------------------------------------------------------------- demo
def example_export() -> Path:
    """The tiny hand-written export shipped with the package."""
    return Path(str(resources.files("odyssey_batch") / "examples" / "tiny_export"))


DEMO_PATIENTS = 300
DEMO_SEED = 42
DEMO_TRAIN_STEPS = 100
DEMO_FINETUNE_EPOCHS = 3
DEMO_TOP = 10


@app.command()
def demo(json_output: JsonOption = False) -> None:
    """Run every stage built so far on the embedded Postgres, and show what each did.

    Always uses the embedded server under ODYSSEY_HOME (never a configured production warehouse), in a database
    of its own (`odyssey_demo`, created afresh each time; the default warehouse `odyssey` is not touched) and an
    object store of its own (ODYSSEY_HOME/demo/objects, emptied first). It shows only its own synthetic patients.
    Today: start the server, migrate the schema, generate a synthetic export of 300 patients (seed 42), ingest
    it, validate it with the data-quality gate, tokenize it into a dataset with task labels, pretrain a tiny
    EHRMamba on it, finetune it on every task, evaluate it against the baselines and the export's true risk
    (HTML report with plots), promote it to champion, score every recent patient on every task, and show the ten
    highest risks per task with their top contributing events.
    """
    import shutil

    from odyssey_batch.ingest import ingest as run_ingest
    from odyssey_batch.synth import generate
    from odyssey_batch.warehouse import connect, upgrade
    from odyssey_batch.warehouse import embedded as embedded_server

    settings = cli_settings().with_overrides(database_url="")
    steps: dict[str, Any] = {}
    if not json_output:
        console.rule("[bold]odyssey-batch demo")
        console.print(f"Starting the embedded Postgres server under {settings.home} ...")
    url = embedded_server.start(settings, embedded_server.DEMO_DATABASE, fresh=True)
    objects = settings.home / "demo" / "objects"
    shutil.rmtree(objects, ignore_errors=True)
    settings = settings.with_overrides(database_url=url, object_store=str(objects))
    steps["warehouse"] = {"url": url, "object_store": str(objects),
                          "migrations_applied": [m.version for m in upgrade(url)]}  # fmt: skip
    if not json_output:
        console.print(f"Warehouse ready: {url}\n")
        console.rule("[bold]1. Synthetic export")
    export = settings.home / "demo" / f"synthetic-{DEMO_PATIENTS}-seed{DEMO_SEED}"
    shutil.rmtree(export, ignore_errors=True)
    steps["synth"] = generate(export, DEMO_PATIENTS, DEMO_SEED).as_dict()
    if not json_output:
        _print_synth_summary(steps["synth"])
        console.rule("[bold]2. Ingest")
    with IngestProgress(enabled=not json_output) as progress:
        result = run_ingest(str(export), settings, url=url, progress=progress)
    steps["ingest"] = result.as_dict()
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            counts = {}
            for name in ("fhir.resource", "ehr.patient", "ehr.encounter", "ehr.condition", "ehr.procedure",
                         "ehr.medication_request", "ehr.observation", "ops.quarantine"):  # fmt: skip
                cur.execute(f"SELECT count(*) FROM {name}")
                counts[name] = cur.fetchone()[0]
    finally:
        conn.close()
    steps["tables"] = counts
    if not json_output:
        _print_ingest_summary(steps["ingest"])
        console.print()
        console.print(table("Warehouse tables now", ["table", "rows"], [[k, v] for k, v in counts.items()]))
        console.rule("[bold]3. Data-quality gate")
        err_console.print("Validating with Great Expectations ...")
    from odyssey_batch.quality.gate import validate as run_validate
    from odyssey_batch.sequences.dataset import tokenize as run_tokenize

    verdict = run_validate(url, settings, result.run_id)
    steps["validate"] = verdict.as_dict()
    if not json_output:
        console.print(verdict.message())
        if verdict.data_docs:
            console.print(f"Data Docs: {verdict.data_docs}")
    if not verdict.success:
        if json_output:
            emit_json(steps)
        raise typer.Exit(1)
    if not json_output:
        console.rule("[bold]4. Tokenize and label")
    with StageProgress(enabled=not json_output) as progress:
        tokens = run_tokenize(url, settings, progress=progress.update)
    steps["tokenize"] = tokens.as_dict()
    if not json_output:
        _print_tokenize_summary(steps["tokenize"])
        console.rule("[bold]5. Pretrain EHRMamba (the tiny preset, a short run)")
    from odyssey_batch.training.pretrain import PretrainOptions, pretrain

    options = PretrainOptions(preset="tiny", max_length=256, batch_size=16, steps=DEMO_TRAIN_STEPS, lr=3e-3,
                              checkpoint_every=DEMO_TRAIN_STEPS)  # fmt: skip
    with TrainProgress(enabled=not json_output) as progress:
        trained = pretrain(url, settings, tokens.dataset_version_id, options, progress=progress.update)
    steps["pretrain"] = trained.as_dict()
    if not json_output:
        console.print(
            f"Training run {trained.training_run_id}: {trained.steps} steps, {trained.tokens:,} tokens, "
            f"{trained.tokens_per_s:,.0f} tokens/s ({trained.backend} scan on {trained.device}); loss "
            f"{trained.train_loss:.2f}, validation {trained.val_loss:.2f}. For a real model: "
            "`odyssey-batch train pretrain --preset small`."
        )
        console.rule("[bold]6. Finetune one model for every task (multitask prompted finetuning)")
    from odyssey_batch.evaluation.evaluate import EvaluateOptions, evaluate_model
    from odyssey_batch.registry.bundle import register_run
    from odyssey_batch.registry.promotion import promote
    from odyssey_batch.training.finetune import FinetuneOptions, finetune

    tuning = FinetuneOptions(max_length=256, batch_size=32, epochs=DEMO_FINETUNE_EPOCHS, lr=3e-3)
    with TrainProgress(enabled=not json_output) as progress:
        tuned = finetune(url, settings, trained.training_run_id, tuning, progress=progress.update)
    version = register_run(url, settings, tuned.training_run_id).model_version
    steps["finetune"] = {**tuned.as_dict(), "model_version": version}
    if not json_output:
        console.print(
            f"Finetuning run {tuned.training_run_id}: best epoch {tuned.best_epoch} of {tuned.epochs}, validation "
            f"loss {tuned.val_loss:.3f}; registered as candidate model version {version}."
        )
        console.rule("[bold]7. Evaluate against baselines and the true risk, then promote")
    evaluation = evaluate_model(url, settings, version, EvaluateOptions(oracle=str(export / "truth.parquet"),
                                                                        resamples=200),
                                progress=None if json_output else lambda m: err_console.print(f"… {m}"))  # fmt: skip
    decision = promote(url, version, settings.promotion_rule(), actor="demo")
    steps["evaluate"] = evaluation.as_dict()
    steps["promotion"] = {"promoted": decision.promote, "reason": decision.reason}
    if not json_output:
        _print_evaluation(steps["evaluate"])
        console.print(f"Promotion: {decision.reason}" + (" → champion." if decision.promote else ""))
        console.rule("[bold]8. Nightly scoring with the champion")
    from odyssey_batch.scoring.run import ScoreOptions
    from odyssey_batch.scoring.run import score as run_scoring

    # every patient seen in the 30 days before the export's end, as of that end (the export's "tonight")
    as_of = dt.datetime.fromisoformat(tokens.data_end)
    with StageProgress(enabled=not json_output) as progress:
        scored = run_scoring(url, settings, as_of, ScoreOptions(cohort="active"), progress=progress.update)
    steps["score"] = scored.as_dict()
    steps["top_risk"] = _top_risk(url, scored.run_id, DEMO_TOP)
    if json_output:
        emit_json(steps)
        return
    console.print(f"Scoring run {scored.run_id} as of {scored.as_of}: {scored.n_patients} patients, "
                  f"{scored.n_scores} scores ({scored.patients_per_s:.1f} patients/s).")  # fmt: skip
    for task, rows in steps["top_risk"].items():
        lines = [[r["patient_id"][:13], f"{r['probability']:.3f}", r["risk_band"], "; ".join(r["top_events"]) or "-"]
                 for r in rows]  # fmt: skip
        console.print(table(f"Highest risk: {task}", ["patient", "risk", "band", "top contributing events"], lines))
    console.print(
        "\nThe tiny preset trains in seconds and is far from the oracle; for a real model: "
        "`odyssey-batch train pretrain --preset small`, then `train finetune` and `evaluate`.\n"
        "\nExplore it with SQL:\n"
        f'  psql "{url}" -c "SELECT * FROM risk.latest_score ORDER BY probability DESC LIMIT 20"\n'
        f'  psql "{url}" -c "SELECT * FROM risk.patient_risk LIMIT 20"\n'
        f'  psql "{url}" -c "SELECT task, method, value FROM ops.model_evaluation WHERE metric = \'auroc\'"\n'
        "The demo has its own database: point other commands at it to explore, e.g.\n"
        f'  ODYSSEY_DATABASE_URL="{url}" ODYSSEY_OBJECT_STORE="{objects}" odyssey-batch show-patient <patient_id>\n'
        "(`odyssey-batch models list` likewise). Your own warehouse (`odyssey-batch db url`) is untouched.\n"
        "Stop the server with `odyssey-batch db stop`."
    )


def _top_risk(url: str, run_id: int, n: int) -> dict[str, list[dict[str, Any]]]:
    """The n highest scores per task of scoring run ``run_id``, each with its top contributing events."""
    from odyssey_batch.warehouse import connect

    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                """SELECT s.task, s.patient_id, s.probability, s.risk_band,
                          coalesce(array_agg(coalesce(e.display, e.token) ORDER BY e.rank)
                                   FILTER (WHERE e.rank <= 3), '{}')
                   FROM (SELECT *, row_number() OVER (PARTITION BY task ORDER BY probability DESC, patient_id) AS n
                         FROM risk.latest_score WHERE run_id = %s) s
                   LEFT JOIN risk.latest_explanation e USING (patient_id, task, run_id)
                   WHERE s.n <= %s
                   GROUP BY s.task, s.patient_id, s.probability, s.risk_band
                   ORDER BY s.task, s.probability DESC, s.patient_id""",
                (run_id, n),
            )
            out: dict[str, list[dict[str, Any]]] = {}
            for task, patient, probability, band, events in cur.fetchall():
                out.setdefault(task, []).append({"patient_id": patient, "probability": probability,
                                                 "risk_band": band, "top_events": list(events)})  # fmt: skip
            return out
    finally:
        conn.close()


from odyssey_batch.cli.forecast import register as register_forecast  # noqa: E402

register_forecast(app)

from odyssey_batch.cli.pull import register as register_pull  # noqa: E402

register_pull(app)


def main() -> None:
    """The entry point: logs and warnings redacted from the start, and an unexpected error reported in one
    redacted line (its traceback with ``--traceback``), exit status 1."""
    from odyssey_batch.redaction import install_log_redaction, redacted_exception

    install_log_redaction()
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:
        if _show_traceback:
            err_console.print(redacted_exception(exc, with_traceback=True), markup=False, highlight=False)
        err_console.print(f"[red]error:[/] {escape(redacted_exception(exc))}")
        if not _show_traceback:
            err_console.print("Run the command again with `odyssey-batch --traceback ...` to see where it failed.")
        sys.exit(1)


if __name__ == "__main__":
    main()
