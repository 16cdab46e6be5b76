"""The install is the tested one: constraints.txt (the lock `make install` installs with pip -c) agrees with
pyproject.toml's ranges, and this environment holds exactly the locked versions."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert m, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def test_every_requirement_of_pyproject_is_locked_within_its_range():
    lock = _lock()
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            assert name not in lock  # the Makefile pins the CPU build; GPU users bring their own
            continue
        assert name in lock, f"{req.name} is in pyproject.toml but not in constraints.txt: run make lock"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"constraints.txt has {req.name}=={lock[name]}, outside pyproject's {req}: run make lock"
        )


def test_this_environment_is_the_locked_set():
    mismatched = {}
    for name, pinned in _lock().items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            mismatched[name] = "not installed"
            continue
        if installed != pinned:
            mismatched[name] = f"{installed} installed, {pinned} locked"
    assert not mismatched, f"make install did not install the lock: {mismatched}"
