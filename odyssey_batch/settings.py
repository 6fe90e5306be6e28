"""One settings object for the whole system.

Values come from, in increasing priority:
1. defaults below;
2. a TOML file: ``$ODYSSEY_CONFIG`` if set, else ``$ODYSSEY_HOME/odyssey.toml`` if it exists;
3. environment variables (``ODYSSEY_*``).

TOML keys are the field names below (``database_url = "postgresql://..."``); environment variables are the
upper-cased names with an ``ODYSSEY_`` prefix (``ODYSSEY_DATABASE_URL``).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "ODYSSEY_"


def _default_home() -> Path:
    return Path(os.environ.get("ODYSSEY_HOME") or Path.home() / ".odyssey").expanduser()


@dataclass(frozen=True)
class Settings:
    """Configuration of one odyssey-batch installation."""

    # Working directory: embedded Postgres data, run artifacts, default object store.
    home: Path = field(default_factory=_default_home)
    # Warehouse. Empty means the embedded Postgres server under ``home``.
    database_url: str = ""
    # Object store for artifacts: a local path or ``s3://bucket/prefix``. Empty means ``home/objects``.
    object_store: str = ""
    # S3 / MinIO connection, used for ``s3://`` object stores and ingest sources.
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = ""
    s3_secure: bool = True
    # Pull from a FHIR server's Bulk Data $export (``odyssey-batch pull``): where exports land (a folder or
    # s3://bucket/prefix), how to authenticate (``smart``, ``bearer``, ``none``; empty: smart when a client id is
    # set, bearer when a token is, else none), the SMART Backend Services client (its private key as PEM text, a
    # JWK set, or a path to a file holding either; the key id; the scopes; the token endpoint, empty: from the
    # server's .well-known/smart-configuration), a static bearer token, the longest single wait between polls or
    # retries (caps Retry-After), and parallel downloads.
    pull_landing: str = ""
    pull_auth: str = ""
    pull_client_id: str = ""
    pull_private_key: str = ""
    pull_key_id: str = ""
    pull_scope: str = "system/*.rs"
    pull_token_url: str = ""
    pull_bearer_token: str = ""
    pull_max_wait_s: float = 300.0
    pull_download_workers: int = 4
    # Timezone applied to FHIR dates that carry no zone (partial dates such as ``2020-05``).
    default_timezone: str = "UTC"
    # The source profile of the FHIR feed (``odyssey_batch/profiles``): a built-in name (``generic``, ``mimic-iv``)
    # or the path of a hospital's own TOML file. Empty: detected per export from ``meta.profile`` (else generic).
    source_profile: str = ""
    # Ingest: parallel validation workers (0 = number of CPU cores) and lines per work chunk.
    ingest_workers: int = 0
    ingest_chunk_lines: int = 2000
    # Ingest: keep a code that is free text only (a CodeableConcept with a text and no coding) as code system
    # TEXT with the normalized text as code; false excludes such resources from ehr.* (reason text-only-code).
    keep_text_codes: bool = True
    # Ingest limits on what an export may hold (exports come from other systems): the bytes of one resource (an
    # NDJSON line, or a whole JSON document such as a Bundle, which is parsed in one piece) and the uncompressed
    # bytes of one file. Larger lines and documents are quarantined as ``too-large`` without being read into memory;
    # a file is read up to its limit (the lines before it load) and the rest refused as ``file-too-large``.
    max_resource_bytes: int = 64 << 20
    max_file_bytes: int = 8 << 30
    # Data-quality gate: code systems allowed in the ehr tables (short names, comma separated), the largest
    # share of a run's lines that may be quarantined, and the largest drop of a table's row count between checks.
    # TEXT is the system of free-text-only codes (see keep_text_codes).
    dq_code_systems: str = "SNOMED,LOINC,RXNORM,ICD10CM,ICD10PCS,ICD9CM,CPT,LOCAL,TEXT"
    dq_max_quarantine_rate: float = 0.05
    dq_max_volume_drop: float = 0.5
    # Data-quality gate: how many seconds a time (transactionTime, an event, meta.lastUpdated) may lie after the
    # moment the run started (the export was received) before it is a critical finding (clocks drift a little).
    dq_future_tolerance_s: int = 300
    # Data-quality gate, row-level checks (an event before birth, an encounter ending before it starts, a lab value
    # no body can have): the failing rows are excluded from everything downstream (ops.dq_exclusion), and the run is
    # rejected only when a check's failing share of its rows passes its threshold (Great Expectations' ``mostly`` is
    # 1 minus it). ``dq_row_failure_rates`` overrides it per check: ``check=rate`` or ``suite:check=rate``, comma
    # separated (e.g. ``not_before_birth=0.01,ehr.encounter:end_not_before_start=0``).
    dq_max_row_failure_rate: float = 0.001
    dq_row_failure_rates: str = ""
    # Tokenization: the longest model input (most recent tokens, cut at a visit boundary), how often a code must
    # appear in training sequences to get its own token, lab value bins per code, patients read per chunk.
    max_length: int = 2048
    vocab_min_count: int = 5
    lab_bins: int = 5
    tokenize_chunk_patients: int = 500
    # Splits by a stable hash of the patient id: the salt and the train / validation fractions (rest: test).
    split_salt: str = "odyssey-v1"
    split_train: float = 0.8
    split_validation: float = 0.1
    # The clinical task registry (TOML); empty means the packaged default six tasks.
    tasks_file: str = ""
    # Promotion rule: a candidate replaces the champion only if, on the same test points, its mean of the metric
    # over tasks is at least the champion's plus ``min_mean_gain`` and no task loses more than ``max_task_drop``.
    promotion_metric: str = "auroc"
    promotion_max_task_drop: float = 0.02
    promotion_min_mean_gain: float = 0.0
    # Nightly scoring: a score is `high` at or above its task's threshold (the F1-optimal one on validation) and
    # `medium` at or above this fraction of it. Explanations (integrated gradients, the top events) for scores of
    # this band and above (`high`, `medium`, `low`, or `none`). Drift: a task is flagged when the population
    # stability index of its scores against the previous runs passes the threshold, a run when the share of
    # unknown event tokens in its inputs does.
    risk_medium_fraction: float = 0.5
    explain_band: str = "high"
    drift_psi_threshold: float = 0.2
    drift_max_unknown_rate: float = 0.05
    drift_history_runs: int = 7
    # Runs that died: every working run refreshes its heartbeat every ``heartbeat_seconds``; an unfinished run
    # whose heartbeat is older than ``stale_run_minutes`` is swept to `abandoned` by the next run of its kind.
    stale_run_minutes: float = 30.0
    heartbeat_seconds: float = 60.0

    @property
    def embedded(self) -> bool:
        """True when no warehouse URL is configured and the embedded server is used."""
        return not self.database_url

    @property
    def object_store_location(self) -> str:
        return self.object_store or str(self.home / "objects")

    def promotion_rule(self):  # -> odyssey_batch.registry.promotion.PromotionRule (imported lazily: no torch here)
        from odyssey_batch.registry.promotion import PromotionRule

        return PromotionRule(metric=self.promotion_metric, max_task_drop=self.promotion_max_task_drop,
                             min_mean_gain=self.promotion_min_mean_gain)  # fmt: skip

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _coerce(name: str, raw: Any) -> Any:
    kinds = {f.name: f.type for f in fields(Settings)}
    kind = kinds[name]
    if kind == "Path":
        return Path(str(raw)).expanduser()
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        return str(raw).strip().lower() in {"1", "true", "yes", "on"}
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return str(raw)


def _config_file(env: dict[str, str], home: Path) -> Path | None:
    explicit = env.get("ODYSSEY_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"ODYSSEY_CONFIG points to {path}, which is not a file")
        return path
    candidate = home / "odyssey.toml"
    return candidate if candidate.is_file() else None


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build the settings from defaults, the optional TOML file and the environment."""
    env = dict(os.environ if env is None else env)
    names = {f.name for f in fields(Settings)}
    home = Path(env.get("ODYSSEY_HOME") or Path.home() / ".odyssey").expanduser()
    values: dict[str, Any] = {"home": home}

    config_path = _config_file(env, home)
    if config_path is not None:
        with config_path.open("rb") as fh:
            data = tomllib.load(fh)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{config_path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        values.update({k: _coerce(k, v) for k, v in data.items()})

    for name in names:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw)
    return Settings(**values)
