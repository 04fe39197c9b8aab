"""A colocated worker's logic, without Ray or asyncio: whole requests, prefill and decode, in one
engine on a KV cache of its own (the worker actor's ColocatedWorker only delegates to this).

    submit(rid, prompt[, images]) ──▶ images encoded here (vision-language model, no encode pool)
        ──▶ WAITING in the engine's scheduler ──▶ RUNNING in its continuous batch ──▶ FINISHED
    cancel(rid) ──▶ aborted; its blocks back to the pool

Nothing is received from another worker, so the KV cache is a plain tensor the engine allocates:
no transport, no shared-memory segment.
"""

from __future__ import annotations

from dataclasses import dataclass

from encode_workers.inproc import InProcessEncoder
from engine.config import EngineConfig
from engine.kv_cache import image_hash
from engine.llm_engine import LLMEngine, LoadedModel
from engine.sequence import SamplingParams, StepOutput
from engine.tensor_parallel import TPGroup


@dataclass(frozen=True)
class ColocatedOptions:
    engine: EngineConfig
    image_encoder_dir: str | None = None  # vision-language model: load the vision side, encode in-process


class ColocatedCore:
    def __init__(
        self,
        options: ColocatedOptions,
        loaded: LoadedModel,
        image_encoder: InProcessEncoder | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        """image_encoder: a vision side already in memory; without it, it is loaded from
        options.image_encoder_dir when that is set (and the model takes images). tp: the
        tensor-parallel group the engine drives (rank 0)."""
        self.options = options
        self.engine = LLMEngine(options.engine, loaded, tp=tp)
        self.layout = self.engine.layout
        self.image_encoder = None  # vision-language model (encode_workers/inproc.py)
        if options.image_encoder_dir is not None and loaded.image_spec is not None:
            self.image_encoder = image_encoder or InProcessEncoder.from_model_dir(
                options.image_encoder_dir, loaded.model.dtype
            )

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        images: list[bytes] | tuple[bytes, ...] = (),
        resume: tuple[int, int] | None = None,
        tenant: str = "",
        cache_salt: str = "",
    ) -> None:
        """Queue a whole request; its images (if any) are encoded first. InvalidRequestError names
        an image that is not one. resume: a re-prefilled request's earlier output
        (LLMEngine.add_request); tenant: who sent it; cache_salt: whose cached prefixes it may use
        (a prompt with images is cached under its images' content hashes too)."""
        features = None
        if images:
            if self.image_encoder is None:
                raise ValueError(f"model {self.engine.loaded.name} takes no images on this worker")
            features, _ = self.image_encoder.encode(list(images))
        self.engine.add_request(
            list(prompt_token_ids),
            sampling,
            request_id,
            image_features=features,
            resume=resume,
            tenant=tenant,
            cache_salt=cache_salt,
            image_hashes=[image_hash(b) for b in images],
        )

    def cancel(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def request_ids(self) -> list[str]:
        return self.engine.request_ids()

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[StepOutput]:
        return self.engine.step()

    def idle(self) -> bool:
        """No request queued or running: every block is free."""
        return not self.engine.has_unfinished()

    def close(self) -> None:
        """The KV cache is a plain tensor, freed with the engine; a tensor-parallel engine
        ends its followers' loops."""
        self.engine.close()
