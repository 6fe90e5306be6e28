"""Keeping secrets out of everything odyssey-batch prints or logs.

``redact(text)`` is the one function every message, summary, error and log record goes through before it
reaches a person. It hides:

* the password of a URL (``postgresql://user:pw@host/db`` -> ``postgresql://user:***@host/db``);
* ``password=...`` (and ``sslpassword``, ``secret``, ``secret_key``, ``token``, ...) in URL queries, key=value
  DSNs (quoted or not) and JSON/repr text;
* every secret the process was configured with (``remember_secrets``): the warehouse password and the S3
  secret key, wherever they appear, also inside a library's error message that quotes part of a malformed DSN;
* the row values PostgreSQL quotes in constraint errors (``DETAIL: Key (patient_id)=(...)``, ``Failing row
  contains (...)``) and SQLAlchemy's ``[parameters: ...]``, which are patient identifiers and clinical values.

``install_log_redaction()`` makes every log record, of every logger, pass through ``redact`` when it is created
(message, arguments and traceback), so handlers added later (Airflow's, a user's) never see a secret.

``odyssey-batch db url`` is the one documented exception: it prints the full URL for ``psql``.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable
from urllib.parse import quote, unquote

MASK = "***"
# Shorter secrets are not replaced as plain text (it would garble every message); the patterns still hide them.
_MIN_SECRET_LENGTH = 4

# scheme://user:password@host: the password runs to the last '@' before whitespace or a quote.
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@'\"]*:)[^\s'\"]*(?P<tail>@)")
# password=, sslpassword=, PGPASSWORD=, secret=, ODYSSEY_S3_SECRET_KEY=, aws_secret_access_key=, ...
_KEYS = r"(?:[\w.]*_)?(?:password|passwd|pwd|sslpassword|pgpassword|secret|secret_key|secret_access_key)"
# key=value in a DSN or a query string: 'quoted with \' escapes', "double quoted", or up to a separator.
_KEY_VALUE = re.compile(
    rf"(?P<head>(?<![\w.])(?:{_KEYS})\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&;,'\")]*)",
    re.IGNORECASE,
)
# "password": "value" or 'password': 'value' (JSON, Python reprs of dicts)
_QUOTED_KEY = re.compile(
    rf"(?P<head>(?P<q>['\"])(?:{_KEYS})(?P=q)\s*:\s*)(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")",
    re.IGNORECASE,
)

# PostgreSQL's DETAIL of a unique, foreign-key or check violation quotes the row's values.
_KEY_DETAIL = re.compile(r"(?P<head>\bKey \([^)]*\))=\((?:[^()]|\([^()]*\))*\)")
_FAILING_ROW = re.compile(r"(?P<head>\bFailing row contains )\(.*\)")
# SQLAlchemy's errors end with the statement's parameters: ``[parameters: {...}]``.
_SQL_PARAMETERS = re.compile(r"(?P<head>\[parameters: ).*?(?P<tail>\](?:\n|$|\s*\(Background))", re.DOTALL)

_known: set[str] = set()


def remember_secrets(*values: str | None) -> None:
    """Secrets to hide wherever they appear as plain text (also percent-encoded or decoded), from now on in this
    process."""
    for value in values:
        for form in {value or "", unquote(value or ""), quote(value or "", safe="")}:
            if len(form) >= _MIN_SECRET_LENGTH:
                _known.add(form)


def dsn_password(dsn: str) -> str | None:
    """The password inside a libpq URL or key=value DSN, if it has one; read with the patterns above when libpq
    cannot parse it (its error message may quote the malformed part)."""
    from psycopg2.extensions import parse_dsn

    try:
        return parse_dsn(dsn).get("password")
    except Exception:  # a malformed DSN
        pass
    url = re.search(r"://[^\s:/@'\"]*:(?P<pw>[^\s'\"]*)@", dsn)
    if url:
        return url.group("pw")
    pair = re.search(r"(?<![\w.])password\s*=\s*(?:'(?P<q>(?:[^'\\]|\\.)*)'?|(?P<bare>[^\s&;,'\")]*))", dsn)
    return (pair.group("q") if pair.group("q") is not None else pair.group("bare")) if pair else None


def remember_settings_secrets(settings) -> None:  # settings: odyssey_batch.settings.Settings (no import cycle)
    """Remember the warehouse password, the S3 secret key and the pull's bearer token and private key of
    ``settings``."""
    remember_secrets(
        dsn_password(settings.database_url) if settings.database_url else None,
        settings.s3_secret_key,
        getattr(settings, "pull_bearer_token", None),
    )
    key = getattr(settings, "pull_private_key", "") or ""
    if key.lstrip().startswith(("-----BEGIN", "{")):  # key material (a path to a key file is not a secret)
        remember_secrets(key.strip())


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every password and secret it contains, and the row values of a constraint error, replaced
    by ``***``."""
    if not text:
        return text
    out = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + m.group("tail"), text)
    out = _KEY_VALUE.sub(lambda m: m.group("head") + MASK, out)
    out = _QUOTED_KEY.sub(lambda m: m.group("head") + m.group("q") + MASK + m.group("q"), out)
    out = _KEY_DETAIL.sub(lambda m: m.group("head") + f"=({MASK})", out)
    out = _FAILING_ROW.sub(lambda m: m.group("head") + f"({MASK})", out)
    out = _SQL_PARAMETERS.sub(lambda m: m.group("head") + MASK + m.group("tail"), out)
    for secret in sorted({*_known, *(s for s in secrets if len(s) >= _MIN_SECRET_LENGTH)}, key=len, reverse=True):
        out = out.replace(secret, MASK)
    return out


def redacted_exception(exc: BaseException, *, with_traceback: bool = False) -> str:
    """One line ``Type: message`` (or the whole traceback), redacted."""
    if with_traceback:
        return redact("".join(traceback.format_exception(exc)).rstrip())
    return redact(f"{type(exc).__name__}: {exc}")


_installed = False


def install_log_redaction() -> None:
    """Redact every log record at creation: its message with arguments, its traceback and stack (idempotent).

    Also routes ``warnings`` through logging, so that they are redacted too."""
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            record.msg = redact(record.getMessage())
            record.args = None
        except Exception:  # a record whose arguments do not format: keep only its redacted template
            record.msg, record.args = redact(str(record.msg)), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    logging.setLogRecordFactory(factory)
    logging.captureWarnings(True)
    _installed = True


# ---------------------------------------------------------------------------------------- patient identifiers
# A FHIR reference `Type/id` (not inside a path), or a `urn:uuid:` full URL.
_REFERENCE = re.compile(r"(?<![\w/])(?P<type>[A-Z][A-Za-z]{2,})/(?P<id>[A-Za-z0-9\-.]{1,64})\b")
_URN = re.compile(r"\burn:(?P<kind>uuid|oid):[A-Za-z0-9\-.]+", re.IGNORECASE)


def mask_ids(text: str, ids: Iterable[str | None] = ()) -> str:
    """``text`` without resource identifiers: ``ids`` (the resource's own) wherever they appear, every
    ``Type/id`` reference and ``urn:uuid:`` URL. For listings shown to operators (``quarantine``), where an id
    may be a medical record number."""
    if not text:
        return text
    for value in sorted({i for i in ids if i}, key=len, reverse=True):
        text = text.replace(value, MASK)
    text = _REFERENCE.sub(lambda m: f"{m.group('type')}/{MASK}", text)
    return _URN.sub(lambda m: f"urn:{m.group('kind')}:{MASK}", text)
