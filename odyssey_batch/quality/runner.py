"""Running the suites with Great Expectations 1.x on an ephemeral context over the live warehouse.

GX is imported here only (its import takes seconds), so other commands never pay for it. Each suite becomes a
GX ExpectationSuite validated against one query asset: the suite's table, restricted to the rows written by
the gated ingest run (``scoping``: ``run_or_all`` follows the requested scope, ``run`` always restricts, ``all``
never does).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from odyssey_batch.quality.checks import Suite
from odyssey_batch.warehouse import sqlalchemy_url

SAMPLE_SIZE = 20


@dataclass
class Finding:
    suite: str
    expectation: str
    severity: str
    success: bool
    description: str
    observed_value: Any
    unexpected_count: int | None
    sample: list[Any]
    error: str | None = None
    level: str = "feed"  # feed, record or patient (checks.Check.level)
    failure_rate: float | None = None  # row-level: the failing share of the batch
    max_failure_rate: float | None = None  # row-level: the share above which the run is rejected
    excluded_rows: int = 0  # row-level: rows recorded in ops.dq_exclusion

    @property
    def row_level(self) -> bool:
        return self.level != "feed"


def batch_query(suite: Suite, run_id: int, whole_warehouse: bool) -> str:
    restrict = suite.scoping == "run" or (suite.scoping == "run_or_all" and not whole_warehouse)
    return f"SELECT * FROM {suite.table}" + (f" WHERE run_id = {int(run_id)}" if restrict else "")


_ALIASED = re.compile(r"\{batch\}\s+(?!(?:WHERE|GROUP|ORDER|LIMIT|UNION)\b)[A-Za-z_]\w*")


def rows_query(check_sql: str, batch: str) -> str:
    """A check's SQL over the batch query, as Great Expectations runs it: ``{batch} b`` becomes ``(batch) b``, and
    a ``{batch}`` without an alias ``(batch) AS subselect`` (so that what the gate records is what GX counted)."""
    wrapped = f"({batch})" if _ALIASED.search(check_sql) else f"({batch}) AS subselect"
    return check_sql.replace("{batch}", wrapped)


def _gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    return gx, ProgressBarsConfig


def _finding(suite: Suite, result: Any) -> Finding:
    meta = result.expectation_config.meta or {}
    details = result.result or {}
    error = None
    if result.exception_info and result.exception_info.get("raised_exception"):
        error = str(result.exception_info.get("exception_message"))[:2000]
    if "unexpected_count" in details:  # a built-in column expectation
        count = details.get("unexpected_count")
        sample = details.get("partial_unexpected_index_list") or []
        sample = [row.get(suite.key) if isinstance(row, dict) else row for row in sample]
        observed = details.get("observed_value", count)
    else:  # an UnexpectedRowsExpectation, or a table-level expectation
        observed = details.get("observed_value")
        rows = (details.get("details") or {}).get("unexpected_rows") or []
        sample = [dict(row) if not isinstance(row, dict) else row for row in rows]
        count = observed if meta.get("kind") == "rows" and isinstance(observed, int) else None
    return Finding(
        suite=suite.name,
        expectation=meta.get("name", result.expectation_config.type),
        severity=meta.get("severity", "critical"),
        success=bool(result.success) and error is None,
        description=result.expectation_config.description or "",
        observed_value=observed,
        unexpected_count=count,
        sample=sample[:SAMPLE_SIZE],
        error=error,
        level=meta.get("level", "feed"),
    )


def run_suites(url: str, suites: list[Suite], run_id: int, *, whole_warehouse: bool,
               docs_dir: Path | None = None) -> list[Finding]:  # fmt: skip
    """Validate every suite; one finding per check, in declaration order."""
    gx, progress_config = _gx()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = progress_config(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(
            site_name="odyssey",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    source = context.data_sources.add_postgres(name="warehouse", connection_string=sqlalchemy_url(url))
    definitions = []
    for suite in suites:
        asset = source.add_query_asset(name=suite.name, query=batch_query(suite, run_id, whole_warehouse))
        batch = asset.add_batch_definition_whole_table("batch")
        for rows_kind, checks in (("rows", [c for c in suite.checks if c.sql]),
                                  ("builtin", [c for c in suite.checks if not c.sql])):  # fmt: skip
            if not checks:
                continue
            gx_suite = context.suites.add(gx.ExpectationSuite(name=f"{suite.name}:{rows_kind}"))
            for check in checks:
                meta = {"name": check.name, "severity": check.severity, "kind": rows_kind, "level": check.level}
                if check.sql:
                    expectation = gx.expectations.UnexpectedRowsExpectation(
                        unexpected_rows_query=check.sql, description=check.description, meta=meta
                    )
                else:
                    cls = getattr(gx.expectations, str(check.expectation))
                    expectation = cls(**check.kwargs, description=check.description, meta=meta)
                gx_suite.add_expectation(expectation)
            result_format: dict[str, Any] = {"result_format": "COMPLETE" if rows_kind == "rows" else "SUMMARY",
                                             "partial_unexpected_count": SAMPLE_SIZE}  # fmt: skip
            if rows_kind == "builtin" and suite.key:
                result_format["unexpected_index_column_names"] = [suite.key]
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{suite.name}:{rows_kind}", data=batch, suite=gx_suite)
            )
            definitions.append((suite, definition, result_format))

    findings: list[Finding] = []
    try:
        for suite, definition, result_format in definitions:
            result = definition.run(result_format=result_format)
            findings.extend(_finding(suite, r) for r in result.results)
        if docs_dir is not None:
            context.build_data_docs(site_names=["odyssey"])
    finally:
        # GX keeps SQLAlchemy pools open (the data source's and its execution engine's): close both, so that no
        # connection outlives the validation.
        source.get_engine().dispose()
        source.get_execution_engine().engine.dispose()
    return findings
