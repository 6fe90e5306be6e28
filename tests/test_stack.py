"""The docker-compose stack (docker-compose.yml, .env.example, infra/), checked without a Docker engine.

Static checks, fast and offline: the compose file parses; every service has an image or a build whose context and
Dockerfile exist; long-running services have health checks and restart policies, one-shots are waited for; every
variable the compose file reads is in .env.example or has a default; every ODYSSEY_* name is a setting; the Airflow
services share the odyssey settings and mount the repository's dags/; the images install the README's extras; the
GPU services ask for a GPU under the `gpu` profile only; published ports are on 127.0.0.1 only. One test runs the
Airflow database init script against the test Postgres (when a psql client is installed), and one runs
`docker compose config` where a Docker CLI with the compose plugin is installed (CI has none).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
import uuid
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from odyssey_batch.settings import Settings

yaml = pytest.importorskip("yaml")  # PyYAML: a dependency of apache-airflow (the `airflow` extra)

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
INFRA = REPO / "infra"
AIRFLOW_DB_SQL = INFRA / "postgres-init" / "10-airflow-db.sql"

# The services issue 10 names; the stack may have more.
AIRFLOW_CORE_SERVICES = {
    "airflow-init",
    "airflow-api-server",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
}
CELERY_WORKERS = {"airflow-worker": ("celery", "default"), "airflow-worker-gpu": ("gpu", "gpu")}
GPU_SERVICES = {"trainer", "airflow-worker-gpu"}
ONE_SHOTS = {"minio-init", "airflow-db-init", "airflow-init"}
# What each health check must run (a substring of its command line).
HEALTHCHECKS = {
    "warehouse": "pg_isready",
    "minio": "mc ready local",
    "airflow-api-server": "/api/v2/monitor/health",
    "airflow-scheduler": "airflow jobs check --job-type SchedulerJob --local",
    "airflow-dag-processor": "airflow jobs check --job-type DagProcessorJob --local",
    "airflow-triggerer": "airflow jobs check --job-type TriggererJob --local",
}
DAGS_TARGET = "/opt/airflow/dags"
# ODYSSEY_* names in the stack that are not fields of odyssey_batch.settings.Settings, and why.
NOT_SETTINGS = {
    "ODYSSEY_DATABASE_PASSWORD": "compose passes it to the containers as PGPASSWORD (libpq), never as a setting",
    "ODYSSEY_IMAGE": "the tag of the image compose builds from infra/Dockerfile",
    "ODYSSEY_TRAINING_QUEUE": "read by dags/retrain.py (the Celery queue of its training tasks), not by the library",
}
# Variables docker compose itself reads from .env.
COMPOSE_OWN_VARIABLES = {"COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES"}
# Uncommented .env.example names holding a secret (a change-me placeholder, never a usable default).
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET")
# Secrets whose .env.example comment must say how to generate one.
GENERATED_SECRETS = ("AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY")


# ------------------------------------------------------------------------------------ compose interpolation


class MissingVariable(LookupError):
    """A ${VAR:?message} or ${VAR?message} whose variable is unset (or empty, for :?)."""


@dataclass(frozen=True)
class Reference:
    name: str
    operator: str  # "" for $VAR / ${VAR}; else one of :- - :? ? :+ +


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


def _closing_brace(text: str, start: int) -> int:
    """Index of the "}" that closes the "${" whose body starts at ``start`` (nested ${...} skipped)."""
    depth, i = 1, start
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unclosed ${{ in {text!r}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err},
    ${VAR:+alt}, ${VAR+alt}, nested in defaults."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$":
            out.append(char)
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            body = text[i + 2 : end]
            i = end + 1
            match = _NAME.match(body)
            if not match:
                raise ValueError(f"invalid interpolation ${{{body}}} in {text!r}")
            name, rest = match.group(), body[match.end() :]
            operator = next((op for op in _OPERATORS if rest.startswith(op)), "")
            if rest and not operator:
                raise ValueError(f"invalid interpolation ${{{body}}} in {text!r}")
            argument = rest[len(operator) :]
            value = env.get(name)
            if operator == "":
                out.append(value or "")
            elif operator in (":-", "-"):
                unset = value is None or (operator == ":-" and value == "")
                out.append(interpolate(argument, env) if unset else value)
            elif operator in (":?", "?"):
                if value is None or (operator == ":?" and value == ""):
                    raise MissingVariable(f"{name}: {interpolate(argument, env)}")
                out.append(value)
            else:  # :+ and +
                present = value is not None and (operator == "+" or value != "")
                out.append(interpolate(argument, env) if present else "")
            continue
        match = _NAME.match(text, i + 1)
        if match:
            out.append(env.get(match.group()) or "")
            i = match.end()
            continue
        out.append("$")
        i += 1
    return "".join(out)


def collect(text: str, refs: list[Reference]) -> None:
    """Record every reference in ``text`` without evaluating it: also those inside defaults (a default may hold
    a required ${X:?...} that the values at hand never reach)."""
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            body = text[i + 2 : end]
            match = _NAME.match(body)
            if match:
                rest = body[match.end() :]
                operator = next((op for op in _OPERATORS if rest.startswith(op)), "")
                refs.append(Reference(match.group(), operator))
                collect(rest[len(operator) :], refs)
            i = end + 1
        elif text[i] == "$" and (match := _NAME.match(text, i + 1)):
            refs.append(Reference(match.group(), ""))
            i = match.end()
        else:
            i += 1


def test_interpolation_parser_follows_compose() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("a $$SET ${SET} $SET", env) == "a $SET v v"
    assert interpolate("${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d}", env) == "d d  d"
    assert interpolate("${UNSET:-x${SET:-y}z}", env) == "xvz"
    assert interpolate("${SET:+alt} ${EMPTY:+alt}|${EMPTY+alt}", env) == "alt |alt"
    assert interpolate("${EMPTY?e}", env) == ""
    with pytest.raises(MissingVariable, match="UNSET: set it"):
        interpolate("${UNSET:?set it}", env)
    with pytest.raises(MissingVariable):
        interpolate("${EMPTY:?set it}", env)
    refs: list[Reference] = []
    collect("${A:-${B:?b}} $$F $C ${D+${E}}", refs)
    assert refs == [Reference("A", ":-"), Reference("B", ":?"), Reference("C", ""), Reference("D", "+"),
                    Reference("E", "")]  # fmt: skip


# ------------------------------------------------------------------------------------------------ loading


@cache
def raw_compose() -> str:
    return COMPOSE_FILE.read_text()


@cache
def compose() -> dict[str, Any]:
    """The compose file as YAML (anchors and merge keys resolved), not yet interpolated."""
    data = yaml.safe_load(raw_compose())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: _interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolated(value, env) for value in node]
    return node


@cache
def references() -> tuple[Reference, ...]:
    refs: list[Reference] = []
    for text in _strings(compose()):
        collect(text, refs)
    return tuple(refs)


@dataclass(frozen=True)
class EnvLine:
    name: str
    value: str
    commented: bool
    comment: str  # the comment lines right above it


@cache
def env_example() -> dict[str, EnvLine]:
    """NAME=value lines of .env.example, also the commented-out examples (# NAME=value)."""
    entries: dict[str, EnvLine] = {}
    comment: list[str] = []
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        stripped = line.strip()
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", stripped)
        if match:
            commented = bool(match.group(1))
            name, value = match.group(2), match.group(3)
            assert commented or name not in entries or entries[name].commented, f".env.example:{number}: {name} twice"
            if not commented or name not in entries:
                entries[name] = EnvLine(name, value, commented, "\n".join(comment))
            comment = [] if not commented else comment
            continue
        if stripped.startswith("#"):
            comment.append(stripped)
        elif stripped:
            pytest.fail(f".env.example:{number}: not NAME=value: {line!r}")
        else:
            comment = []
    return entries


def example_env() -> dict[str, str]:
    """The environment .env.example gives compose (uncommented lines; quotes as compose strips them)."""
    env = {}
    for entry in env_example().values():
        if not entry.commented:
            value = entry.value
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            env[entry.name] = value
    return env


@cache
def resolved() -> dict[str, Any]:
    """The compose file interpolated with .env.example's values."""
    return _interpolated(compose(), example_env())


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_line(value: Any) -> str:
    return value if isinstance(value, str) else " ".join(str(part) for part in value or [])


def healthcheck_line(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    if isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL"):
        test = test[1:]
    return command_line(test)


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume, short or long syntax."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source", "")), str(volume["target"])))
        else:
            parts = str(volume).split(":")
            mounts.append((parts[0], parts[1]) if len(parts) > 1 else ("", parts[0]))
    return mounts


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def airflow_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services().items() if "AIRFLOW__CORE__EXECUTOR" in environment(svc)}


def requests_gpu(service: dict[str, Any]) -> bool:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return any("gpu" in (device.get("capabilities") or []) for device in devices)


def joined_dockerfile(path: Path) -> str:
    """The Dockerfile with line continuations joined (one RUN instruction per line)."""
    return re.sub(r"\\\n\s*", " ", path.read_text())


def project_installs(path: Path) -> list[set[str]]:
    """The extras of every `pip install` of the project itself (".", ".[a,b]") in a Dockerfile."""
    installs = []
    for command in re.split(r"&&|;|\n", joined_dockerfile(path)):
        if "pip install" not in command:
            continue
        for word in shlex.split(command.split("pip install", 1)[1]):
            match = re.fullmatch(r"\.(?:\[([\w,-]*)\])?", word)
            if match:
                installs.append({extra for extra in (match.group(1) or "").split(",") if extra})
    return installs


def readme_install_extras(text: str) -> set[str]:
    match = re.search(r'pip install (?:--quiet )?-c constraints\.txt -e "\.\[([\w,-]+)\]"', text)
    assert match, 'no `pip install -c constraints.txt -e ".[...]"` command (the install with the lock) found'
    return set(match.group(1).split(","))


# ------------------------------------------------------------------------------------------------- tests


def test_compose_file_parses_and_has_the_issue_services() -> None:
    names = set(services())
    expected = {"warehouse", "minio", "minio-init", "odyssey", "trainer"} | AIRFLOW_CORE_SERVICES
    assert expected | set(CELERY_WORKERS) | {"redis", "airflow-db-init"} <= names
    for name, service in services().items():
        assert isinstance(service, dict), name
    resolved()  # interpolates with .env.example's values without a missing variable


def test_every_service_has_an_image_or_a_build_that_exists() -> None:
    for name, service in resolved()["services"].items():
        build = service.get("build")
        assert build or service.get("image"), f"{name}: neither image nor build"
        if build:
            context = (REPO / (build if isinstance(build, str) else build.get("context", "."))).resolve()
            assert context.is_dir(), f"{name}: build context {context} does not exist"
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            assert service.get("image"), f"{name}: a built image needs a tag that other services can share"
        else:
            assert re.fullmatch(r"[\w./-]+(:[\w.-]+)?", service["image"]), f"{name}: image {service['image']!r}"


def test_long_running_services_have_health_checks_and_restart_policies() -> None:
    for name, service in services().items():
        restart = str(service.get("restart", ""))
        if name in ONE_SHOTS:
            assert restart == "no", f"{name} is a one-shot job: restart must be 'no'"
            continue
        assert restart in {"always", "unless-stopped"} or restart.startswith("on-failure"), f"{name}: restart"
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: a long-running service needs a healthcheck"
        assert healthcheck_line(service).strip() not in {"", "NONE"}, name
    for name, needle in HEALTHCHECKS.items():
        assert needle in healthcheck_line(services()[name]), f"{name}: health check should run {needle!r}"
    for name in CELERY_WORKERS:
        assert "inspect ping" in healthcheck_line(services()[name]), name


def test_dependencies_wait_for_health_or_completion() -> None:
    all_services = services()
    for name, service in all_services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions (long syntax)"
        own_profiles = set(service.get("profiles") or [])
        for target, spec in depends.items():
            assert target in all_services, f"{name} depends on unknown {target}"
            condition = (spec or {}).get("condition")
            if condition == "service_healthy":
                assert all_services[target].get("healthcheck"), f"{name} waits for {target}, which has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target in ONE_SHOTS, f"{name} waits for {target} to exit, but it is long-running"
            else:
                pytest.fail(f"{name} -> {target}: condition {condition!r}")
            # Whenever `name` is enabled, `target` must be too, or compose refuses to start.
            target_profiles = set(all_services[target].get("profiles") or [])
            if target_profiles:
                assert own_profiles and own_profiles <= target_profiles, f"{name} -> {target}: profiles"
    for name in airflow_services():
        if name != "airflow-init":
            assert "airflow-init" in services()[name]["depends_on"], f"{name} must wait for airflow-init"


def test_named_volumes_are_declared_and_used() -> None:
    declared = set(compose().get("volumes") or {})
    used = set()
    for name, service in services().items():
        for source, target in volume_mounts(service):
            assert PurePosixPath(target).is_absolute(), f"{name}: {target}"
            if source and not is_bind(source):
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
            elif is_bind(source):
                assert source.startswith("./"), f"{name}: bind mounts stay inside the repository: {source}"
    assert used == declared
    assert {"warehouse-data", "minio-data", "airflow-logs"} <= declared


def test_every_variable_is_in_env_example_or_has_a_default() -> None:
    documented = env_example()
    by_name: dict[str, set[str]] = {}
    for ref in references():
        by_name.setdefault(ref.name, set()).add(ref.operator)
    for name, operators in sorted(by_name.items()):
        has_default = bool(operators & {":-", "-"})
        required = bool(operators & {":?", "?"})
        entry = documented.get(name)
        if required or not has_default:
            assert entry and not entry.commented, f"{name} is required by docker-compose.yml: set it in .env.example"
        else:
            assert entry or has_default, name
    unused = set(documented) - set(by_name) - COMPOSE_OWN_VARIABLES
    assert not unused, f".env.example sets variables docker-compose.yml never reads: {sorted(unused)}"
    # Without any .env the stack refuses to start, naming a secret.
    with pytest.raises(MissingVariable):
        _interpolated(compose(), {})


def test_secrets_are_change_me_placeholders_from_env_only() -> None:
    for entry in env_example().values():
        if SECRET_NAME.search(entry.name) and not entry.commented:
            assert entry.value.startswith("change-me"), f"{entry.name} needs a change-me placeholder"
    for name in GENERATED_SECRETS:
        entry = env_example()[name]
        assert re.search(r"openssl rand|python3? -c", entry.comment), f"{name}: say how to generate one"
    for name, service in services().items():
        for key, value in environment(service).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):
                assert "${" in value, f"{name}: {key} must come from .env, not the compose file"
    # Every password inside a URL (user:password@host) comes from a secret of .env.
    sentinel = "FROM-DOT-ENV"
    env = {name: sentinel if SECRET_NAME.search(name) else value for name, value in example_env().items()}
    urls = [text for text in _strings(_interpolated(compose(), env)) if "://" in text]
    for password in re.findall(r"://[^\s:/@]*:([^\s@/]+)@", "\n".join(urls)):
        assert password == sentinel, f"a URL in docker-compose.yml has a literal password: {password!r}"


def test_odyssey_names_are_settings() -> None:
    field_names = {f"ODYSSEY_{field.name.upper()}" for field in fields(Settings)}
    names = {ref.name for ref in references()} | set(env_example())
    for service in services().values():
        names |= set(environment(service))
    odyssey_names = {name for name in names if name.startswith("ODYSSEY_")}
    unknown = odyssey_names - field_names - set(NOT_SETTINGS)
    assert not unknown, f"not fields of odyssey_batch.settings.Settings: {sorted(unknown)}"
    assert set(NOT_SETTINGS) <= odyssey_names, "NOT_SETTINGS lists a name the stack no longer uses"
    assert not set(NOT_SETTINGS) & field_names


def test_airflow_services_share_the_settings_and_mount_the_dags() -> None:
    found = airflow_services()
    assert AIRFLOW_CORE_SERVICES | set(CELERY_WORKERS) <= set(found)
    odyssey_env = environment(services()["odyssey"])
    for name, service in found.items():
        env = environment(service)
        missing = {key for key, value in odyssey_env.items() if env.get(key) != value}
        assert not missing, f"{name} lacks the odyssey settings {sorted(missing)} (x-odyssey-env)"
        for key in ("AIRFLOW_CONN_ODYSSEY_WAREHOUSE", "AIRFLOW_VAR_ODYSSEY_LANDING", "AIRFLOW_VAR_ODYSSEY_TIMEZONE"):
            assert key in env, f"{name}: {key}"
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == DAGS_TARGET, name
        dags = [source for source, target in volume_mounts(service) if target == DAGS_TARGET]
        assert len(dags) == 1 and is_bind(dags[0]), f"{name} must mount the repository's dags/ at {DAGS_TARGET}"
        assert (REPO / dags[0]).resolve() == REPO / "dags", f"{name}: {dags[0]}"
        if name != "airflow-worker-gpu":
            assert service["build"]["dockerfile"] == "infra/Dockerfile", f"{name} runs from the odyssey image"
            assert service["image"] == services()["odyssey"]["image"], name


def test_airflow_configuration_defaults() -> None:
    for env in (example_env(), {k: v for k, v in example_env().items() if k != "AIRFLOW_EXECUTOR"}):
        api = _interpolated(services()["airflow-api-server"], env)
        config = environment(api)
        assert config["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert config["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@warehouse:5432/airflow"), "metadata: own database"
    assert config["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-api-server:8080/execution/"
    assert config["AIRFLOW_VAR_ODYSSEY_LANDING"] == "s3://fhir-landing/"
    assert config["AIRFLOW_VAR_ODYSSEY_TIMEZONE"] == example_env()["ODYSSEY_DEFAULT_TIMEZONE"]
    # The warehouse connection: a postgres URI without a password (libpq reads PGPASSWORD).
    uri = config["AIRFLOW_CONN_ODYSSEY_WAREHOUSE"]
    assert re.fullmatch(r"postgres(ql)?://[^:@/]+@warehouse:5432/\w+", uri), uri
    assert config["PGPASSWORD"] == example_env()["POSTGRES_PASSWORD"]
    for name, (profile, queue) in CELERY_WORKERS.items():
        service = services()[name]
        assert service.get("profiles") == [profile], name
        assert re.search(rf"airflow celery worker .*--queues {queue}\b", command_line(service["command"])), name
    assert {"celery", "gpu"} <= set(services()["redis"]["profiles"])
    header = raw_compose().split("\nx-", 1)[0]
    assert "cp .env.example .env" in header


def test_airflow_database_init_script_is_mounted_and_run() -> None:
    assert AIRFLOW_DB_SQL.is_file()
    relative = "./" + AIRFLOW_DB_SQL.relative_to(REPO).as_posix()
    warehouse = dict(volume_mounts(services()["warehouse"]))
    assert warehouse.get(relative, "").startswith("/docker-entrypoint-initdb.d/"), warehouse
    job = services()["airflow-db-init"]
    target = dict(volume_mounts(job))[relative]
    assert target in command_line(job["command"])
    assert "AIRFLOW_DB_PASSWORD" in environment(services()["warehouse"])
    assert "AIRFLOW_DB_PASSWORD" in environment(job)


def _psql_major() -> int | None:
    psql = shutil.which("psql")
    if not psql:
        return None
    out = subprocess.run([psql, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"(\d+)\.", out)
    return int(match.group(1)) if match else None


@pytest.mark.skipif((_psql_major() or 0) < 15, reason="needs a psql client, version 15 or newer (\\getenv)")
def test_airflow_database_init_script_runs_and_repeats(pg_admin_url: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    user, database = f"airflow_t{suffix}", f"airflow_t{suffix}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(AIRFLOW_DB_USER=user, AIRFLOW_DB_NAME=database)

    def run(password: str | None) -> subprocess.CompletedProcess:
        run_env = dict(env, **({"AIRFLOW_DB_PASSWORD": password} if password is not None else {}))
        return subprocess.run(
            ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-d", pg_admin_url, "-f", str(AIRFLOW_DB_SQL)],
            env=run_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def query(sql: str) -> str:
        done = subprocess.run(["psql", "-X", "-At", "-d", pg_admin_url, "-c", sql], env=env, capture_output=True,
                              text=True, timeout=60, check=True)  # fmt: skip
        return done.stdout.strip()

    if query("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") != "t":
        pytest.skip("the script runs as the warehouse's superuser (POSTGRES_USER); the test server's user is not one")
    try:
        refused = run(None)
        assert refused.returncode != 0 and "AIRFLOW_DB_PASSWORD is not set" in refused.stderr
        assert query(f"SELECT count(*) FROM pg_roles WHERE rolname = '{user}'") == "0"
        first = run("first-password")
        assert first.returncode == 0, first.stderr
        hash_before = query(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'")
        again = run("second-password")  # an existing volume, a changed .env: safe, and the password follows
        assert again.returncode == 0, again.stderr
        assert query(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'") != hash_before
        assert query(f"SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{database}'") == user
        assert query(f"SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles WHERE rolname = '{user}'") == "f"
    finally:
        query(f'DROP DATABASE IF EXISTS "{database}"')
        query(f'DROP ROLE IF EXISTS "{user}"')


def test_images_install_the_readme_extras() -> None:
    readme_extras = readme_install_extras((REPO / "README.md").read_text())
    assert "airflow" in readme_extras
    ci = REPO / ".ci" / "run"
    if ci.is_file():
        assert readme_install_extras(ci.read_text()) == readme_extras, "CI installs what the README says"
    installs = project_installs(INFRA / "Dockerfile")
    assert installs, "infra/Dockerfile never installs the project"
    image_extras = readme_extras - {"dev"}
    assert all(extras == image_extras for extras in installs), f"infra/Dockerfile: {installs} vs README {image_extras}"
    command = f'pip install ".[{",".join(sorted(image_extras))}]"'
    assert command in (INFRA / "README.md").read_text(), f"infra/README.md should state {command}"
    trainer = project_installs(INFRA / "trainer.Dockerfile")
    assert trainer and all(image_extras | {"gpu"} <= extras for extras in trainer), trainer
    for dockerfile in ("Dockerfile", "trainer.Dockerfile"):  # every install in the images uses the lock
        text = joined_dockerfile(INFRA / dockerfile)
        assert "COPY pyproject.toml constraints.txt" in text, dockerfile
        commands = [c for c in re.split(r"&&|;|\n", text)
                    if re.search(r"^\s*(RUN .*)?pip install .*(\.\[|AIRFLOW_CELERY_PROVIDER)", c)]  # fmt: skip
        assert len(commands) == 3, commands  # dependencies, the Celery provider, the project
        for command in commands:
            assert "--constraint constraints.txt" in command, f"{dockerfile}: {command.strip()}"


def test_images_pin_the_versions_of_pyproject() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(spec) for spec in project["dependencies"]]
    for extra in ("airflow", "gpu"):
        requirements += [Requirement(spec) for spec in project["optional-dependencies"][extra]]
    specs = {req.name: req.specifier for req in requirements}
    assert specs["apache-airflow"].contains("3.3.2") and not specs["apache-airflow"].contains("3.4.0")
    for dockerfile in ("Dockerfile", "trainer.Dockerfile"):
        args = dict(re.findall(r"^ARG (\w+)=\"?([^\"\s]+)\"?$", (INFRA / dockerfile).read_text(), re.MULTILINE))
        assert specs["torch"].contains(args["TORCH_VERSION"]), f"{dockerfile}: torch {args['TORCH_VERSION']}"
    trainer_text = (INFRA / "trainer.Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=\"?([^\"\s]+)\"?$", trainer_text, re.MULTILINE))
    assert specs["mamba-ssm"].contains(args["MAMBA_SSM_VERSION"])
    assert specs["causal-conv1d"].contains(args["CAUSAL_CONV1D_VERSION"])
    assert "MAMBA_FORCE_BUILD=TRUE" in trainer_text and '"mamba-ssm==${MAMBA_SSM_VERSION}"' in trainer_text


def test_gpu_services_ask_for_a_gpu_under_the_gpu_profile_only() -> None:
    gpu = {name for name, service in services().items() if requests_gpu(service)}
    assert gpu == GPU_SERVICES
    for name in GPU_SERVICES:
        service = services()[name]
        assert service.get("profiles") == ["gpu"], f"{name} may start only with --profile gpu"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert all(device.get("driver") == "nvidia" for device in devices), name
        assert service["build"]["dockerfile"] == "infra/trainer.Dockerfile", name
        assert service["image"] == services()["trainer"]["image"], name
    for name, service in services().items():
        build = service.get("build") or {}
        if isinstance(build, dict) and build.get("dockerfile") == "infra/trainer.Dockerfile":
            assert name in GPU_SERVICES, f"{name} builds the trainer image outside the gpu profile"


def test_ports_are_published_on_loopback_only() -> None:
    published = {}
    for env in (example_env(), {}):
        try:
            stack = _interpolated(compose(), env)
        except MissingVariable:
            # Defaults only: give the required secrets a value, nothing else.
            required = {ref.name for ref in references() if ref.operator in (":?", "?")}
            stack = _interpolated(compose(), dict.fromkeys(required, "x"))
        for name, service in stack["services"].items():
            assert service.get("network_mode") != "host", name
            for port in service.get("ports") or []:
                if isinstance(port, dict):
                    host_ip = port.get("host_ip", "")
                else:
                    parts = str(port).split(":")
                    host_ip = parts[0] if len(parts) == 3 else ""
                assert host_ip == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"
                published.setdefault(name, []).append(port)
    assert any(str(port).endswith(":8080") for port in published["airflow-api-server"])


def test_env_example_is_the_one_source() -> None:
    legacy = INFRA / "env.example"
    if legacy.exists() or legacy.is_symlink():
        assert legacy.resolve() == ENV_EXAMPLE.resolve() or legacy.read_text() == ENV_EXAMPLE.read_text()
    for ignore in (".gitignore", ".dockerignore"):
        lines = (REPO / ignore).read_text().split()
        assert ".env" in lines or "/.env" in lines, f"{ignore} must list .env"


def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    done = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False, timeout=30)
    return done.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="no `docker compose` on PATH")
def test_docker_compose_config_accepts_the_stack() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    for profiles in ([], ["--profile", "celery", "--profile", "gpu"]):
        done = subprocess.run(
            ["docker", "compose", "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE), *profiles, "config", "-q"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
