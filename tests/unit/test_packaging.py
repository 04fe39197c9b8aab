"""Packaging: the installed distribution holds every package of the project (a non-editable
install too); the SDK installs and imports without the server side, which is an extra declared
with ranges and pinned to the tested versions by constraints.txt (the lock)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
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


HEAVY = (
    "torch",
    "ray",
    "transformers",
    "numpy",
    "yaml",
    "aiohttp",
    "triton",
    "PIL",
    "matplotlib",
    "prometheus_client",
    "gguf",
    "safetensors",
    "grpc_health",
    "grpc_reflection",
)


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].replace(">", " ").replace("<", " ").replace("=", " ").split()[0]


def test_the_sdk_is_light_and_everything_is_a_range_pinned_by_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    extras = project["optional-dependencies"]
    assert sorted(map(_name, base)) == ["grpcio", "protobuf"]
    assert "torch" in map(_name, extras["server"])
    # transformers loads the embedded model's GGUF file only where accelerate is installed
    assert "accelerate" in map(_name, extras["server"]) and "gguf" in map(_name, extras["server"])
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    assert pins["torch"] == "2.13.0"
    assert sorted(extras) == ["dev", "gpu", "plot", "server"]
    for req in [*base, *(r for reqs in extras.values() for r in reqs)]:
        assert _name(req) in pins, f"{req} is not pinned in constraints.txt"
        if _name(req) != "ruff":  # formatting changes between ruff releases: pinned on purpose
            assert "==" not in req.split(";")[0], f"{req}: pyproject declares ranges, constraints.txt pins"


def test_the_built_wheel_installs_the_sdk_alone_into_a_fresh_venv(tmp_path):
    src = tmp_path / "src"  # a copy: building in the tree would leave build/ behind
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", *NOT_SHIPPED)
    shutil.copytree(ROOT, src, ignore=skip)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(src),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("triptych-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    unconditional = sorted(_name(r) for r in requires if "extra ==" not in r)
    assert unconditional == ["grpcio", "protobuf"], requires
    assert any(_name(r) == "torch" and 'extra == "server"' in r for r in requires), requires
    assert any(_name(r) == "triton" and 'extra == "gpu"' in r for r in requires), requires
    assert any(_name(r) == "matplotlib" and 'extra == "plot"' in r for r in requires), requires
    assert "triptych/client.py" in names and "protos/triptych/v1/triptych_pb2.py" in names

    # `pip install triptych` into a fresh venv (grpcio and protobuf from the package index, at the
    # tested versions): the SDK imports and the CLI answers, with no torch, Ray or numpy installed
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    py, cli = venv / "bin" / "python", venv / "bin" / "triptych"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=600)
    check = (
        "import importlib.util; from triptych import Client, AsyncClient; "
        f"print(sorted(m for m in {HEAVY!r} if importlib.util.find_spec(m)))"
    )
    out = subprocess.run([str(py), "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for argv, says in ((["--help"], "serve"), (["--version"], version), (["admin", "status", "--help"], "--json")):
        out = subprocess.run([str(cli), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and says in out.stdout, (argv, out.stdout[-2000:], out.stderr[-2000:])
    out = subprocess.run([str(cli), "serve", "--config", "x.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "pip install 'triptych[server]'" in out.stderr, out.stderr[-2000:]


def test_the_sdk_and_admin_commands_work_without_the_server_side():
    """In a process where every server-side module is missing (as after `pip install triptych`):
    the SDK imports, `triptych admin` parses, and `triptych serve` says what to install."""
    blocker = f"""
import importlib.abc, sys
HEAVY = {HEAVY!r}
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
import triptych
from triptych import Client, AsyncClient
from triptych.cli import main
assert not [m for m in sys.modules if m.split(".")[0] in HEAVY]
code = main(["serve", "--config", "deploy/local.yaml"])
print("serve exit", code)
try:
    main(["admin", "status", "--help"])
except SystemExit as e:
    print("admin help exit", e.code)
"""
    out = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "serve exit 2" in out.stdout and "admin help exit 0" in out.stdout, out.stdout
    assert "pip install 'triptych[server]'" in out.stderr and "no module" in out.stderr, out.stderr
