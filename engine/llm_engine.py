"""The colocated engine: schedule → run → postprocess, and the offline `generate()` API."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import model_loader, multimodal
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.device import default_dtype
from engine.errors import (
    BROKEN_AFTER,
    EngineError,
    InvalidRequestError,
    OutOfKVCacheError,
    WorkerBroken,
    is_device_failure,
)
from engine.kv_cache import BlockManager, CacheKey, cache_key
from engine.kv_layout import KVLayout
from engine.kv_select.selector import KVSelector
from engine.model_runner import ModelRunner
from engine.sampler import RowFailure, Sampler
from engine.scheduler import ScheduledSeq, Scheduler
from engine.tensor_parallel import TPGroup
from engine.sequence import FinishReason, RequestOutput, SamplingParams, Sequence, SequenceStatus, StepOutput

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model and tokenizer loaded once; several engines (and the tests' reference) may share it."""

    model: object
    tokenizer: object
    name: str
    image_token_id: int | None = None  # vision-language models: the image placeholder token
    image_spec: multimodal.ImageFeatureSpec | None = None  # ... and one image's features on the wire

    @classmethod
    def load(
        cls, model: str | None = None, dtype: str | None = None, device: torch.device | str = "cpu"
    ) -> "LoadedModel":
        """Weights in `dtype` (None: the device's default, engine/device.py) on `device`.
        A LLaVA checkpoint directory loads its language side only (the encode pool has the rest)."""
        device = torch.device(device)
        dtype = dtype or default_dtype(device)
        if multimodal.is_llava_dir(model):
            loaded = multimodal.load_llava_language(Path(model).expanduser(), getattr(torch, dtype))
        else:
            hf_model, tokenizer, source = model_loader.load(model, dtype)
            loaded = cls(hf_model, tokenizer, source.name)
        return loaded.placed_on(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def placed_on(self, device: torch.device) -> "LoadedModel":
        """This model with its weights on `device`, moved in place when they are elsewhere (every
        engine sharing this LoadedModel sees them move; their dtype stays)."""
        if self.device != device:
            log.info("moving %s from %s to %s", self.name, self.device, device)
            self.model.to(device)
        return self

    def kv_layout(self, block_size: int) -> KVLayout:
        """The layout of this model's paged KV cache (KVLayout.from_model_config)."""
        return KVLayout.from_model_config(
            self.model.config, model_id=self.name, dtype=self.model.dtype, block_size=block_size
        )

    @property
    def max_model_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def token_text(self, token_id: int) -> str:
        """One token's text, decoded alone (what its log-probabilities are reported with)."""
        return self.tokenizer.decode([token_id])

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids = set()
        gen = getattr(self.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return frozenset(ids)


def tp_runner(loaded: LoadedModel, config: EngineConfig, tp: TPGroup, kv: torch.Tensor | None = None) -> ModelRunner:
    """The model runner of one rank: the model sharded over `tp` (in place; nothing for one
    rank) and a cache of this rank's KV heads (`kv`, or a new one of config.num_kv_blocks)."""
    if tp.size != config.tensor_parallel:
        raise EngineError(
            f"the engine is configured for tensor_parallel {config.tensor_parallel}, its group has {tp.size} ranks"
        )
    tp.shard(loaded.model)
    layout = tp.local_layout(loaded.kv_layout(config.block_size))
    kv = kv if kv is not None else layout.new_cache(config.num_kv_blocks, loaded.device)
    return ModelRunner(loaded.model, layout, kv, tp)


def follower(config: EngineConfig, loaded: LoadedModel, tp: TPGroup) -> int:
    """A follower rank (tp.rank > 0) of the engine whose driver has the same config and model:
    shard, allocate this rank's cache, then run the driver's forwards until it stops (LLMEngine.
    close); returns the number of forwards run."""
    from engine.tensor_parallel import follow

    if tp.is_driver:
        raise EngineError("rank 0 of a tensor-parallel group is the engine, not a follower")
    return follow(tp_runner(loaded.placed_on(tp.device), config, tp), tp)


class RequestValidator:
    """Turns user prompts into token ids and refuses what the engine cannot serve."""

    def __init__(self, tokenizer, max_model_len: int, kv_capacity_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens

    def tokenize(self, prompt: str | list[int] | list[dict]) -> list[int]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = tok(prompt).input_ids if prompt else []
        elif prompt and isinstance(prompt[0], dict):
            try:
                ids = list(
                    tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
                )
            except Exception as exc:
                from jinja2 import TemplateError

                # the template's own words (its raise_exception), e.g. "roles must alternate"
                if isinstance(exc, TemplateError):
                    raise InvalidRequestError(f"the model's chat template refused these messages: {str(exc)[:200]}")
                raise
        else:
            ids = list(prompt)
            vocab = len(tok)
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token ids must be integers in [0, {vocab}), got {bad[:5]}")
        if not ids:
            raise InvalidRequestError("prompt is empty")
        return ids

    def check(self, prompt_ids: list[int], sampling: SamplingParams) -> None:
        n = len(prompt_ids)
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {n} tokens; the model's context is {self.max_model_len} tokens "
                f"(at least one must be left to generate)"
            )
        if n + 1 > self.kv_capacity_tokens:
            raise OutOfKVCacheError(f"prompt has {n} tokens; the KV cache holds only {self.kv_capacity_tokens}")
        # A sequence that can outgrow the whole cache would preempt itself forever.
        longest = min(n + sampling.max_tokens, self.max_model_len)
        if longest > self.kv_capacity_tokens:
            raise OutOfKVCacheError(
                f"prompt of {n} tokens plus max_tokens {sampling.max_tokens} can reach {longest} tokens; "
                f"the KV cache holds only {self.kv_capacity_tokens}"
            )


class LLMEngine:
    """Colocated serving engine.

    >>> engine = LLMEngine(EngineConfig())
    >>> engine.generate(["Hello"], SamplingParams(max_tokens=8))[0].text
    """

    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        kv: torch.Tensor | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        """The device is resolved here, once (`config.placement()`): the weights (a `loaded`
        model elsewhere is moved), the KV cache and the sampler live on it. A `kv` cache given
        by the caller (a transport's receive buffer) must already be there (ModelRunner checks).
        tp: this engine is rank 0 (the driver) of a tensor-parallel group whose other ranks run
        `follower()` (engine/tensor_parallel.py); the model is sharded here."""
        self.config = config
        self.placement = config.placement()
        device = self.placement.device
        if kv is not None and kv.device != device:
            where = f"pool {config.pool!r}: " if config.pool else ""
            raise EngineError(
                f"{where}the KV cache given to the engine is on {kv.device}, but the engine runs on {device} "
                f"(the KV transport must receive into the engine's device: cuda_ipc or nccl for a GPU)"
            )
        self.loaded = (loaded or LoadedModel.load(config.model, self.placement.dtype, device)).placed_on(device)
        self.max_model_len = min(config.max_model_len or self.loaded.max_model_len, self.loaded.max_model_len)
        self.tp = tp or TPGroup.single(device)
        if not self.tp.is_driver:
            raise EngineError(f"rank {self.tp.rank} of a tensor-parallel group runs follower(), not an engine")
        self.runner = tp_runner(self.loaded, config, self.tp, kv)
        self.layout = self.runner.layout
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_batched_tokens, config.max_num_seqs)
        self.sampler = Sampler(device, self.loaded.token_text)
        self.validator = RequestValidator(
            self.loaded.tokenizer, self.max_model_len, config.num_kv_blocks * config.block_size
        )
        self.eos_token_ids = self.loaded.eos_token_ids
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._ids = itertools.count()
        self._prompt_embeds: dict[str, torch.Tensor] = {}  # image requests: [prompt len, H]
        self._failed_streak = 0  # batches in a row in which every sequence failed (WorkerBroken)
        self.selector: KVSelector | None = None  # decode-side KV selection (config.kv_selection)
        self.set_kv_selection(config.kv_selection)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def set_kv_selection(self, selection) -> None:
        """Decode with this KVSelectionConfig (engine/kv_select/config.py) from now on; None or
        method dense: attend to the whole context. Only while no request is in flight (a
        sequence's selection state belongs to the method that made it)."""
        if self._seqs:
            raise EngineError("the KV selection method can change only while no request is in flight")
        if selection is not None and selection.on and self.tp.size > 1:
            raise EngineError(f"KV selection ({selection.method.value}) runs on one rank only")
        self.selector = None
        self.scheduler.uncached_tail = 0
        if selection is not None and selection.on:
            self.selector = KVSelector(selection, self.layout, self.config.num_kv_blocks, self.placement.device)
            self.scheduler.uncached_tail = self.selector.observed_prompt_tokens
            # quest: the key bounds of the blocks already written (a prefix cache's)
            self.selector.refresh_bounds(self.runner.kv, self.blocks.cached_blocks())

    # ---------------------------------------------------------------- requests
    def add_request(
        self,
        prompt: str | list[int] | list[dict],
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        image_features: list[torch.Tensor] | None = None,
        resume: tuple[int, int] | None = None,
        tenant: str = "",
        cache_salt: str = "",
        image_hashes: Seq[bytes] = (),
    ) -> str:
        """image_features: one [num_image_tokens, H] tensor per image token of the prompt, in order.
        resume: (n, chars) for a request re-prefilled after a failure: the prompt's last n tokens
        are its earlier output, of whose text `chars` characters were already delivered.
        tenant: who sent it (new prompts are admitted round robin over tenants).
        cache_salt: with prefix caching, only requests with the same salt share cached blocks.
        image_hashes: the content hash of each image (engine/kv_cache.py image_hash), which keys
        the blocks holding its placeholder tokens; a prompt with images but no hashes is not
        cached (its placeholder tokens do not say which image)."""
        sampling = sampling or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        ids = self.validator.tokenize(prompt)
        embeds = None
        if image_features:
            ids, embeds = multimodal.prompt_with_images(
                self.loaded.model, self.loaded.image_token_id, ids, image_features
            )
        self.validator.check(ids, sampling)
        if image_hashes and len(image_hashes) != len(image_features or ()):
            raise InvalidRequestError(f"{len(image_hashes)} image hashes for {len(image_features or ())} images")
        key = None if embeds is not None and not image_hashes else self._cache_key(cache_salt, ids, image_hashes)
        detok = self._detokenizer(sampling, ids, resume)
        if resume:  # the earlier output was sampled elsewhere
            self.sampler.advance(request_id, sampling, self._vocab_size(), resume[0])
        seq = Sequence(request_id, ids, sampling, arrival=time.monotonic(), tenant=tenant, cache_key=key)
        if embeds is not None:
            self._prompt_embeds[request_id] = embeds
        self._seqs[request_id] = seq
        self._detok[request_id] = detok
        self.scheduler.add(seq)
        return request_id

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        sampling: SamplingParams,
        block_table: list[int],
        resume: tuple[int, int] | None = None,
        cache_salt: str | None = "",
        image_hashes: Seq[bytes] = (),
    ) -> StepOutput:
        """Join a sequence whose prompt K/V already sit in `block_table` (written by a prefill
        worker) and whose first token was sampled there. Returns the first token's output; the
        sequence may already be finished by it (EOS, max_tokens=1, a stop string), or failed
        (FinishReason.ERROR). resume: as add_request's. cache_salt: with prefix caching, its
        prompt's full blocks and then those of its output are cached under this salt (a later
        turn of the conversation finds them: add_request) and its images' content hashes
        (image_hashes); None: never cached. If this raises, it raised before taking
        `block_table`: the blocks are still the caller's."""
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        detok = self._detokenizer(sampling, prompt_token_ids, resume)
        key = None if cache_salt is None else self._cache_key(cache_salt, prompt_token_ids, image_hashes)
        if self.selector is not None:  # quest: key bounds of the blocks the prefill worker wrote
            self.selector.refresh_bounds(self.runner.kv, block_table)
        # The first token (and, resumed, the earlier output) was sampled elsewhere: skip its draws.
        self.sampler.advance(request_id, sampling, self._vocab_size(), 1 + (resume[0] if resume else 0))
        seq = Sequence(
            request_id,
            list(prompt_token_ids),
            sampling,
            arrival=time.monotonic(),
            token_ids=list(prompt_token_ids) + [first_token],
            num_computed_tokens=len(prompt_token_ids),
            block_table=block_table,
            status=SequenceStatus.RUNNING,
            cache_key=key,
        )
        if seq.cache_key is not None:  # its prompt's K/V landed from a prefill worker: reusable now
            self.blocks.register(block_table, seq.block_hashes, seq.token_ids, len(prompt_token_ids), seq.cache_key)
        self._seqs[request_id] = seq
        self._detok[request_id] = detok
        self.scheduler.running.append(seq)
        return self._postprocess(seq)

    def _cache_key(self, salt: str, ids: Seq[int], image_hashes: Seq[bytes]) -> CacheKey:
        """The prompt's cache key (engine/kv_cache.py); InvalidRequestError when its image tokens do
        not make as many images as it has hashes."""
        try:
            return cache_key(salt, ids, self.loaded.image_token_id, image_hashes)
        except ValueError as err:
            raise InvalidRequestError(f"cannot key the prompt's images: {err}") from None

    def _vocab_size(self) -> int:
        """Width of the logits rows the sampler draws over."""
        return self.loaded.model.get_output_embeddings().weight.shape[0]

    def _detokenizer(
        self, sampling: SamplingParams, prompt_ids: list[int], resume: tuple[int, int] | None
    ) -> Detokenizer:
        if resume is None:
            return Detokenizer(self.tokenizer, sampling.stop)
        n, chars = resume
        if not 0 <= n <= len(prompt_ids) or chars < 0:
            raise InvalidRequestError(f"resume {resume!r} does not fit a prompt of {len(prompt_ids)} tokens")
        return Detokenizer(self.tokenizer, sampling.stop, list(prompt_ids[len(prompt_ids) - n :]), chars)

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self._forget(seq, FinishReason.ABORT)
        return True

    def request_ids(self) -> list[str]:
        """The requests this engine holds (waiting or running)."""
        return list(self._seqs)

    def close(self) -> None:
        """End the tensor-parallel followers' loops (nothing to do for one rank). Idempotent."""
        self.tp.stop()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---------------------------------------------------------------- step
    def step(self) -> list[StepOutput]:
        """One forward over the scheduled batch, then sample and postprocess.

        One sequence's failure is its own: if the batched forward raises, every sequence of the
        batch runs again on its own and only those that fail alone are failed; a row that
        cannot be sampled or detokenized fails alone. Each failed sequence ends with
        FinishReason.ERROR and an error for its client (the cause is logged), and the batch,
        the loop and every other request go on. Only a broken worker raises (WorkerBroken: an
        accelerator error, every sequence failing on its own batch after batch, or any failed
        forward of a tensor-parallel group: a rank died, or the ranks may be out of step)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            sampled = self._compute(batch)
        except Exception as exc:
            if is_device_failure(exc):
                raise WorkerBroken(f"the accelerator failed: {exc}") from exc
            if self.tp.size > 1:  # the ranks may be out of step now: the group is replaced whole
                raise WorkerBroken(f"a forward of the tensor-parallel group failed: {exc}") from exc
            log.exception("forward of a batch of %d failed; running its sequences one by one", len(batch))
            sampled = {}
            for entry in batch:
                try:
                    sampled.update(self._compute([entry]))
                except Exception as exc:
                    if is_device_failure(exc):
                        raise WorkerBroken(f"the accelerator failed: {exc}") from exc
                    log.exception("forward of request %s failed", entry.seq.request_id)
                    sampled[entry.seq.request_id] = RowFailure("the forward pass failed for this request")
        failed = {key: out for key, out in sampled.items() if isinstance(out, RowFailure)}
        self._failed_streak = self._failed_streak + 1 if len(batch) >= 2 and len(failed) == len(batch) else 0
        if self._failed_streak >= BROKEN_AFTER:
            raise WorkerBroken(f"every sequence failed on its own in {BROKEN_AFTER} batches in a row")
        self.scheduler.update(
            [e for e in batch if e.seq.request_id not in failed],
            {key: t for key, t in sampled.items() if key not in failed},
        )
        outs = []
        for entry in batch:
            seq = entry.seq
            if seq.request_id in failed:
                outs.append(self._fail(seq, failed[seq.request_id].message))
            elif seq.request_id in sampled:
                outs.append(self._postprocess(seq))
        return outs

    def _compute(self, batch: list[ScheduledSeq]) -> dict[str, int | RowFailure]:
        """Forward + sample: {request id: token or RowFailure} for the entries that sample."""
        embeds = None
        if self._prompt_embeds:
            embeds = multimodal.packed_inputs_embeds(
                batch, self._prompt_embeds, self.loaded.model.get_input_embeddings()
            )
        select = self.selector.plan(batch) if self.selector is not None else None
        result = self.runner.forward(batch, sparse=self.config.sparse, inputs_embeds=embeds, select=select)
        if self.selector is not None:
            self.selector.update(select)
        seqs = [e.seq for e in result.sampled]
        tokens = self.sampler.sample(result.logits, [s.request_id for s in seqs], [s.sampling for s in seqs])
        return {s.request_id: t for s, t in zip(seqs, tokens)}

    def _finish_reason(self, seq: Sequence) -> FinishReason | None:
        last = seq.token_ids[-1]
        if not seq.sampling.ignore_eos and last in self.eos_token_ids:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= seq.sampling.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _postprocess(self, seq: Sequence) -> StepOutput:
        logprob = self.sampler.take_logprob(seq.request_id)  # before _forget drops it
        try:
            detok = self._detok[seq.request_id]
            new_text, hit_stop = detok.update(seq.token_ids, seq.num_prompt_tokens)
            reason = FinishReason.STOP if hit_stop else self._finish_reason(seq)
            if reason is not None:
                new_text += detok.flush()
                seq.output_text = detok.text
        except Exception:
            log.exception("detokenizing request %s failed", seq.request_id)
            return self._fail(seq, "decoding the generated tokens to text failed for this request")
        if reason is not None:
            self._forget(seq, reason)
        return StepOutput(
            seq.request_id,
            [seq.token_ids[-1]],
            new_text,
            reason is not None,
            reason,
            cached_tokens=seq.num_cached_tokens,
            logprobs=() if logprob is None else (logprob,),
        )

    def _fail(self, seq: Sequence, message: str) -> StepOutput:
        """End one sequence with an error; its blocks go back to the pool."""
        seq.error = message
        self._forget(seq, FinishReason.ERROR)
        return StepOutput(seq.request_id, [], "", True, FinishReason.ERROR, error=message)

    def _forget(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self._seqs.pop(seq.request_id, None)
        self._detok.pop(seq.request_id, None)
        self.sampler.forget(seq.request_id)
        self._prompt_embeds.pop(seq.request_id, None)
        if self.selector is not None:
            self.selector.forget(seq.request_id)

    # ---------------------------------------------------------------- offline API
    def generate(
        self, prompts: list, sampling: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run prompts (text, token ids, or chat message lists) to completion in one batch."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        # Validate everything before anything is queued, so a bad prompt leaves no state behind.
        checked = []
        for prompt, p in zip(prompts, params):
            ids = self.validator.tokenize(prompt)
            self.validator.check(ids, p)
            checked.append((ids, p))
        order = [self.add_request(ids, p) for ids, p in checked]
        seqs = {rid: self._seqs[rid] for rid in order}
        while any(not s.is_finished for s in seqs.values()):
            self.step()
        return [
            RequestOutput(rid, s.prompt_token_ids, s.output_token_ids, s.output_text, s.finish_reason, s.error)
            for rid, s in seqs.items()
        ]
