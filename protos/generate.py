"""Regenerate the checked-in Python code for the .proto files under protos/.

    python -m protos.generate           # rewrite protos/**/*_pb2*.py(i) in place
    python -m protos.generate --check   # exit 1 if the checked-in code is stale

protoc runs with the repository root as include path, so a file at
`protos/triptych/v1/triptych.proto` generates imports of the form
`from protos.triptych.v1 import triptych_pb2`. That keeps generated code inside the top-level
`protos` package and never shadows the SDK package `triptych`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto sources, relative to the repository root."""
    return sorted(p.relative_to(REPO_ROOT) for p in PROTOS_DIR.rglob("*.proto"))


def generated_files(root: Path) -> dict[Path, bytes]:
    """Generated files under root/protos, keyed by path relative to root."""
    out = {}
    for path in (root / "protos").rglob("*"):
        if path.is_file() and path.name.endswith(GENERATED_SUFFIXES):
            out[path.relative_to(root)] = path.read_bytes()
    return out


def generate_into(out_root: Path) -> None:
    """Run protoc for every .proto, writing generated code under out_root (mirrors the repo)."""
    from grpc_tools import protoc  # dev dependency; only needed here

    include = str(Path(protoc.__file__).parent / "_proto")  # well-known types
    for proto in proto_files():
        args = [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"-I{include}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(REPO_ROOT / proto),
        ]
        (out_root / proto.parent).mkdir(parents=True, exist_ok=True)
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {proto}")


def stale_files() -> list[str]:
    """Paths whose checked-in content differs from a fresh generation (or is missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_into(Path(tmp))
        fresh = generated_files(Path(tmp))
    current = generated_files(REPO_ROOT)
    return sorted(str(p) for p in fresh.keys() | current.keys() if fresh.get(p) != current.get(p))


def regenerate() -> list[str]:
    """Rewrite generated code in place; return the paths written."""
    for path in generated_files(REPO_ROOT):
        (REPO_ROOT / path).unlink()
    with tempfile.TemporaryDirectory() as tmp:
        generate_into(Path(tmp))
        fresh = generated_files(Path(tmp))
        for path in fresh:
            shutil.copyfile(Path(tmp) / path, REPO_ROOT / path)
    return sorted(str(p) for p in fresh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code (run `make protos`):", *stale, sep="\n  ", file=sys.stderr)
            return 1
        print("generated code is up to date")
        return 0
    for path in regenerate():
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
