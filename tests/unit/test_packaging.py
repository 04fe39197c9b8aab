"""The installed distribution holds every package of the project (a non-editable install too)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]
NOT_SHIPPED = ("tests", "bench", "deploy", "docs", "build")


def test_package_discovery_finds_every_package_of_the_tree():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(str(ROOT), include=include))
    on_disk = {
        str(p.parent.relative_to(ROOT)).replace("/", ".")
        for p in ROOT.glob("*/**/__init__.py")
        if p.relative_to(ROOT).parts[0] not in NOT_SHIPPED and not p.relative_to(ROOT).parts[0].startswith(".")
    }
    assert on_disk - found == set(), "packages a non-editable install would lose"
    assert {"triptych.commands", "engine.sparse", "protos.triptych.v1"} <= found
    assert not any(p.split(".")[0] in NOT_SHIPPED for p in found)
