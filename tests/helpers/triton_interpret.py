"""Running Triton kernels under the interpreter on CPU, for kernel tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(module: str, path: Path, timeout_s: float) -> dict:
    """`module._run_cases(path)` in a subprocess with TRITON_INTERPRET=1 (Triton reads it when it
    is imported, so a test process that already imported it cannot switch); what it saved."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"import sys; from {module} import _run_cases; _run_cases(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert proc.returncode == 0, f"interpreted kernel run failed:\n{proc.stderr[-4000:]}"
    return torch.load(path)
