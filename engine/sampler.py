"""Token sampling: greedy rows in one argmax, the others one by one with their own generator.

A seeded request's tokens are drawn from one stream (its seed's generator) wherever they are
sampled: a worker that continues a request whose earlier tokens were sampled elsewhere (the
decode worker after the prefill worker's first token; any worker after a re-prefill) first
`advance`s the generator past those draws. One multinomial draw over V probabilities consumes
the same random numbers whatever the probabilities are, so a draw over uniform weights of the
same size skips exactly one token's randomness (tests/unit/test_worker_actor.py checks the streams
match).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.sequence import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowFailure:
    """A row of a batch that could not be sampled. Only its own sequence fails; `message` is
    what its client is told (the cause, if any, is logged with the request id)."""

    message: str


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def advance(self, request_id: str, params: SamplingParams, vocab_size: int, draws: int) -> None:
        """Skip the random numbers of `draws` tokens this request sampled elsewhere (seeded,
        non-greedy requests only: the others draw nothing or from the global generator)."""
        if params.greedy or params.seed is None or draws <= 0:
            return
        gen = self._generator(request_id, params.seed)
        uniform = torch.ones(vocab_size)
        for _ in range(draws):
            torch.multinomial(uniform, 1, generator=gen)

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> list[int | RowFailure]:
        """logits [N, V] float → per row a token id, or a RowFailure for a row that has none.

        Rows never fail each other: a NaN row (the model's numerics broke on that sequence), a
        distribution with nothing to draw from, or any error while drawing one row fails that
        row alone."""
        if not params:
            return []
        out: list[int | RowFailure] = logits.argmax(dim=-1).tolist()
        nan_rows = torch.isnan(logits).any(dim=-1).tolist()
        for i, p in enumerate(params):
            if nan_rows[i]:
                out[i] = RowFailure("the model produced invalid (NaN) scores for this request")
            elif not p.greedy:
                try:
                    out[i] = self._draw(logits[i], request_ids[i], p)
                except Exception:
                    log.exception("sampling request %s failed", request_ids[i])
                    out[i] = RowFailure("sampling failed for this request")
        return out

    def _draw(self, logits: torch.Tensor, request_id: str, p: SamplingParams) -> int | RowFailure:
        row = logits.float() / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # drop a token once the mass before it already reaches top_p (the top token stays)
            drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            row = row.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
            return RowFailure(
                f"sampling with temperature {p.temperature:g}, top_p {p.top_p:g}, top_k {p.top_k} left no token to draw"
            )
        return int(torch.multinomial(probs, 1, generator=self._generator(request_id, p.seed)).item())
