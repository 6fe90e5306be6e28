"""The locked dependency set: ``constraints.txt``, compiled from ``pyproject.toml``, the one thing every install uses.

    .venv/bin/python infra/lock.py refresh    # after editing pyproject.toml: resolve it, keeping every allowed pin
    .venv/bin/python infra/lock.py refresh --upgrade [PACKAGE ...]   # move packages (all: none named) forward
    .venv/bin/python infra/lock.py check      # does constraints.txt still match pyproject.toml (and this venv)?

Every install names it (``pip install -c constraints.txt -e ".[airflow,dev]"``, the Dockerfiles, ``.ci/run``), so a
fresh clone resolves the same ~300 versions on any day, whatever was released since. Refresh on purpose, run the
tests, commit both files together. ``check`` fails when:

- ``pyproject.toml``'s requirements changed since the lock was compiled (the lock's header records their sha256),
- a requirement of ``pyproject.toml`` has no pin in the lock, or a pin outside its range,
- the build backend is not pinned exactly (``[build-system] requires``), so editable builds are reproducible too,
- with ``--installed``: a locked package is installed here at another version (the install skipped the lock).

torch: the lock pins ``torch==2.13.0``; on CPU machines the local CPU wheel (``2.13.0+cpu``) satisfies it, and pip
takes it instead of the CUDA build from PyPI. ``refresh`` writes that pin whatever build resolved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "constraints.txt"
EXTRAS = ("airflow", "celery", "dev")  # the README installs airflow+dev, the images airflow+celery; `gpu` is built
# in the trainer image against the lock (infra/trainer.Dockerfile)
_HASH_LINE = "# pyproject-requirements-sha256: "
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: dict) -> dict[str, list[str]]:
    """What the lock is compiled from: base, the installed extras, the build backend, the Python range."""
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    return {
        "requires-python": [project["requires-python"]],
        "dependencies": sorted(project["dependencies"]),
        **{f"extra:{name}": sorted(extras.get(name, [])) for name in EXTRAS},
        "build-system": sorted(pyproject["build-system"]["requires"]),
    }


def requirements_hash(pyproject: dict) -> str:
    return hashlib.sha256(json.dumps(requirements(pyproject), sort_keys=True).encode()).hexdigest()


def read_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def problems(pyproject: dict, lock_text: str, installed: dict[str, str] | None = None) -> list[str]:
    """Every way the lock disagrees with ``pyproject`` (and, given ``installed``, with an environment)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    found = []
    recorded = next((line[len(_HASH_LINE) :].strip() for line in lock_text.splitlines() if line.startswith(_HASH_LINE)),
                    None)  # fmt: skip
    if recorded != requirements_hash(pyproject):
        found.append("pyproject.toml's requirements changed since constraints.txt was compiled")
    pins = read_pins(lock_text)
    wanted = requirements(pyproject)
    for section in ("dependencies", *(f"extra:{name}" for name in EXTRAS)):
        for line in wanted[section]:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            pin = pins.get(canonical(requirement.name))
            if pin is None:
                found.append(f"{requirement.name} ({section}) has no pin in constraints.txt")
            elif not requirement.specifier.contains(Version(pin), prereleases=True):
                found.append(f"{requirement.name}=={pin} in constraints.txt is outside {line!r} ({section})")
    for line in wanted["build-system"]:
        requirement = Requirement(line)
        specs = list(requirement.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            found.append(f"build requirement {line!r} is not pinned exactly (==)")
    for name, version in sorted((installed or {}).items()):
        pin = pins.get(canonical(name))
        if pin is not None and Version(version).public != Version(pin).public:
            found.append(f"{name} {version} is installed but constraints.txt pins {pin}")
    return found


def installed_versions() -> dict[str, str]:
    return {canonical(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def refresh(upgrade: list[str] | None) -> None:
    """Re-resolve: pins still allowed by pyproject.toml are kept unless ``upgrade`` names them (``[]``: all)."""
    pyproject = tomllib.loads(PYPROJECT.read_text())
    command = [
        sys.executable, "-m", "piptools", "compile", "--quiet", "--strip-extras", "--allow-unsafe",
        "--no-emit-index-url", "--no-emit-find-links", "--newline=lf",
        *(f"--extra={name}" for name in EXTRAS), "--output-file", str(LOCK), str(PYPROJECT),
    ]  # fmt: skip
    if upgrade == []:
        command.append("--upgrade")
    for name in upgrade or []:
        command += ["--upgrade-package", name]
    subprocess.run(command, check=True, cwd=ROOT)
    body = [line for line in LOCK.read_text().splitlines() if not line.startswith("#")]
    body = [re.sub(r"^torch==2\.13\.0\+\w+$", "torch==2.13.0", line) for line in body]
    header = [
        "# The locked dependency set for Python 3.11 (Linux): every install uses it as a constraints file.",
        "# From pyproject.toml (base + extras airflow, celery, dev) by: .venv/bin/python infra/lock.py refresh",
        "# Do not edit by hand; `infra/lock.py check` (run by the tests) fails when it disagrees with pyproject.toml.",
        _HASH_LINE + requirements_hash(pyproject),
    ]
    LOCK.write_text("\n".join(header + body).rstrip("\n") + "\n")
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(read_pins(LOCK.read_text()))} pins")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    again = sub.add_parser("refresh", help="re-resolve pyproject.toml into constraints.txt (needs the network)")
    again.add_argument("--upgrade", nargs="*", metavar="PACKAGE",
                       help="move these packages (none named: every package) to their newest allowed release; "
                            "otherwise every pin pyproject.toml still allows is kept")  # fmt: skip
    check = sub.add_parser("check", help="fail when constraints.txt disagrees with pyproject.toml")
    check.add_argument("--installed", action="store_true", help="also compare with this environment's packages")
    args = parser.parse_args(argv)
    if args.command == "refresh":
        refresh(args.upgrade)
        return 0
    pyproject = tomllib.loads(PYPROJECT.read_text())
    found = problems(pyproject, LOCK.read_text(), installed_versions() if args.installed else None)
    for problem in found:
        print(f"lock: {problem}", file=sys.stderr)
    if found:
        print("refresh it: .venv/bin/python infra/lock.py refresh (then run the tests, commit both files)",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"constraints.txt matches pyproject.toml ({len(read_pins(LOCK.read_text()))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
