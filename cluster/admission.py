"""Admission: what a request must pass before any worker sees it.

    prepare(request)   images decoded once to check them (bad bytes, too large, a text-only
                       model), chat template applied, tokenized, image tokens expanded, prompt
                       and sampling checked against the model and the KV capacity
                       — no side effect, so the gateway runs it on a worker thread
    admit(request)     the router's in-flight cap, no duplicate request id, a live worker for
                       every phase it needs; then the request's Flight is registered

Every refusal is a RouterError naming the problem (INVALID_ARGUMENT for bad input,
RESOURCE_EXHAUSTED for the cap, UNAVAILABLE without a live worker), raised before the first
event, with a fixed metric reason. Nothing here is awaited: a request is admitted or refused at
once; waiting for a decode slot or KV space happens in dispatch, bounded by its deadline.
"""

from __future__ import annotations

import itertools
import logging

from cluster.flight import Flight
from cluster.pools import Pools
from cluster.router_api import ChatMessage, ErrorKind, GenerateInput, ModelInfo, Prepared, RouterError
from engine import multimodal
from engine.errors import EngineError, OutOfKVCacheError
from engine.kv_cache import image_hash
from engine.llm_engine import RequestValidator
from engine.worker_api import Mode

log = logging.getLogger(__name__)


class Admission:
    def __init__(
        self,
        *,
        mode: Mode,
        tokenizer,
        model_info: ModelInfo,
        kv_capacity_tokens: int,
        pools: Pools,
        flights: dict[str, Flight],
        max_inflight: int,
        image_token_id: int | None = None,
        tokens_per_image: int = 0,
        max_image_pixels: int | None = None,
    ) -> None:
        self.mode = mode
        self.tokenizer = tokenizer
        self.info = model_info
        self.validator = RequestValidator(tokenizer, model_info.max_model_len, kv_capacity_tokens)
        self.pools = pools
        self.flights = flights
        self.max_inflight = max_inflight
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_image_pixels = max_image_pixels  # images larger than this are refused before decoding
        self._ids = itertools.count()

    # ------------------------------------------------------------------ prepare (any thread)
    def prepare(self, request: GenerateInput) -> Prepared:
        """Decode the images (checking them) and tokenize: no side effect, safe on any thread."""
        images = self._images(request)
        return Prepared(tuple(self._prompt_ids(request, images)), images, tuple(image_hash(b) for b in images))

    def _images(self, request: GenerateInput) -> tuple[bytes, ...]:
        """The request's images in prompt order, each decoded once so bad bytes fail here."""
        images = tuple(request.images) + tuple(b for m in request.messages or () for b in m.images)
        if images and not self.info.supports_images:
            raise RouterError(
                ErrorKind.INVALID_ARGUMENT, f"model {self.info.name} does not accept images", "images_not_supported"
            )
        if request.images and request.messages is not None:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, "with messages, images go in the messages, not the request")
        for i, data in enumerate(images):
            try:
                multimodal.decode_image(data, i, self.max_image_pixels)
            except EngineError as exc:
                raise RouterError(ErrorKind.INVALID_ARGUMENT, str(exc), "bad_image") from None
        return images

    def _chat(self, messages) -> list[dict]:
        """Chat messages for the template; a message's images become image tokens before its text
        ("<image>\n..." as LLaVA's chat format has them)."""
        token = self.tokenizer.decode([self.image_token_id]) if self.image_token_id is not None else ""
        return [
            {"role": m.role, "content": (token * len(m.images) + "\n" if m.images else "") + m.content}
            for m in messages
        ]

    def _prompt_ids(self, request: GenerateInput, images: tuple[bytes, ...] = ()) -> list[int]:
        """Token ids as the workers see them: with images, each image token expanded."""
        if request.messages is not None:
            prompt = self._chat(request.messages)
        elif request.token_ids is not None:
            prompt = list(request.token_ids)
        elif request.prompt is not None:
            prompt = request.prompt
        else:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, "request has no prompt, messages or token_ids")
        try:
            ids = self.validator.tokenize(prompt)
            if images:
                ids = multimodal.expand_image_tokens(ids, self.image_token_id, len(images), self.tokens_per_image)
            self.validator.check(ids, request.sampling)
        except OutOfKVCacheError as exc:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, str(exc), "prompt_too_long") from None
        except EngineError as exc:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, str(exc), "bad_prompt") from None
        except Exception:  # the tokenizer or chat template choked on this input
            log.exception("tokenizing request %s failed", request.request_id)
            raise RouterError(ErrorKind.INVALID_ARGUMENT, "the prompt could not be tokenized", "bad_prompt") from None
        return ids

    def apply_chat_template(self, messages) -> list[int]:
        """Token ids of a chat, one image token per image (before expansion)."""
        return self.validator.tokenize(self._chat(messages))

    def count_tokens(self, messages) -> int:
        return len(self.apply_chat_template(messages)) + sum(len(m.images) for m in messages) * (
            self.tokens_per_image - 1
        )

    def estimate_tokens(self, message: ChatMessage) -> int:
        text = len(self.tokenizer(message.content).input_ids) if message.content else 0
        return text + len(message.images) * self.tokens_per_image

    # ------------------------------------------------------------------ admit (event loop)
    def admit(self, request: GenerateInput, prepared: Prepared) -> Flight:
        """Register the request's Flight, or refuse it. The caller must end the flight (dispatch
        unregisters it when the request ends, whichever way)."""
        if len(self.flights) >= self.max_inflight:
            raise RouterError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"the server has {len(self.flights)} requests in flight (limit {self.max_inflight}); retry later",
                "server_busy",
            )
        if request.request_id in self.flights:
            raise RouterError(
                ErrorKind.INVALID_ARGUMENT,
                f"request id {request.request_id!r} is already in flight",
                "duplicate_request_id",
            )
        live = any(w.serving for w in self.pools.decode)
        if self.mode is Mode.DISAGGREGATED:
            live = live and any(w.serving for w in self.pools.prefill)
        if not live:
            raise RouterError(ErrorKind.UNAVAILABLE, "no live worker can serve this request", "no_worker")
        flight = Flight(
            request.request_id or f"req-{next(self._ids)}", images=prepared.images, image_hashes=prepared.image_hashes
        )
        self.flights[flight.request_id] = flight
        return flight
