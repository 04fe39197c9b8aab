"""Every environment variable the engine reads, read here and nowhere else."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted model weights are cached (TRIPTYCH_CACHE_DIR, default ~/.cache/triptych)."""
    return Path(os.environ.get("TRIPTYCH_CACHE_DIR", Path.home() / ".cache" / "triptych"))


def hf_offline() -> None:
    """Nothing is ever downloaded from a model hub: force transformers offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
