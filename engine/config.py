"""Engine configuration: one frozen object, validated once."""

from dataclasses import dataclass

from engine.errors import EngineError


@dataclass(frozen=True)
class EngineConfig:
    """How one engine instance loads its model and sizes its KV cache and batches.

    model: None for the embedded SmolLM2-135M-Instruct, else a local HF directory or a .gguf file.
    block_size: tokens per KV block.
    num_kv_blocks: KV blocks in the pool (memory = blocks * block_size * KVLayout.bytes_per_token).
    max_num_batched_tokens: token budget of one forward (decode tokens + prefill chunks).
    max_num_seqs: most sequences in the running batch.
    max_model_len: context limit; None takes the model's own.
    """

    model: str | None = None
    dtype: str = "float32"
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 64
    max_model_len: int | None = None
    sparse: object | None = None  # engine.sparse.SparsePrefillConfig, or None for dense prefill

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise EngineError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise EngineError(f"EngineConfig.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
