"""Engine configuration: one frozen object, validated once."""

from dataclasses import dataclass

from engine.device import Placement, check_device, resolve_placement
from engine.errors import EngineError


@dataclass(frozen=True)
class EngineConfig:
    """How one engine instance loads its model and sizes its KV cache and batches.

    model: None for the embedded SmolLM2-135M-Instruct, else a local HF directory or a .gguf file.
    dtype: the weights' and KV cache's dtype; None takes the device's default (engine/device.py:
        bfloat16 on CUDA, float32 on the CPU). Used when the engine loads the model itself; an
        engine given a loaded model runs in that model's dtype.
    device: auto | cpu | cuda | cuda:N (engine/device.py). The default is cpu, so an engine built
        in a script or test runs where its model was loaded; a deployment passes its pool's
        setting (default auto). Resolved on the machine that runs the engine (`placement`), never
        where the config is built.
    pool: the deploy pool these settings are for, named in device errors; None outside a deployment.
    block_size: tokens per KV block.
    num_kv_blocks: KV blocks in the pool (memory = blocks * block_size * KVLayout.bytes_per_token).
    max_num_batched_tokens: token budget of one forward (decode tokens + prefill chunks).
    max_num_seqs: most sequences in the running batch.
    max_model_len: context limit; None takes the model's own.
    tensor_parallel: ranks the engine's model is sharded over (engine/tensor_parallel.py); the
        engine with more than one is given its group (rank 0 drives, the others follow).
    prefix_caching: keep computed full blocks for reuse by later prompts with the same prefix
        (engine/kv_cache.py); cached blocks are evicted before any request waits for memory.
    kv_selection: decode-side KV selection (engine/kv_select/config.py KVSelectionConfig), or
        None: every decode step attends to the whole context. One rank only (tensor_parallel 1).
    """

    model: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    pool: str | None = None
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 64
    max_model_len: int | None = None
    sparse: object | None = None  # engine.sparse.SparsePrefillConfig, or None for dense prefill
    tensor_parallel: int = 1
    prefix_caching: bool = False
    kv_selection: object | None = None  # engine.kv_select.config.KVSelectionConfig

    def __post_init__(self) -> None:
        for name in ("block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise EngineError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.prefix_caching, bool):
            raise EngineError(f"EngineConfig.prefix_caching must be true or false, got {self.prefix_caching!r}")
        if self.kv_selection is not None and getattr(self.kv_selection, "on", False) and self.tensor_parallel > 1:
            raise EngineError(
                f"EngineConfig.kv_selection ({self.kv_selection.method.value}) runs on one rank only; "
                f"tensor_parallel is {self.tensor_parallel}"
            )
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise EngineError(f"EngineConfig.dtype must be float32, float16, bfloat16 or None, got {self.dtype!r}")
        try:
            check_device(self.device)
        except ValueError as err:
            raise EngineError(str(err)) from None

    def placement(self) -> Placement:
        """The device and dtype of an engine with these settings in this process; DeviceError
        (naming the pool and this node) when they ask for a GPU it does not have."""
        return resolve_placement(self.device, self.dtype, self.pool)
