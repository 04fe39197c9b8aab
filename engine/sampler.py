"""Token sampling: greedy rows in one argmax, the others one by one with their own generator.

A seeded request's tokens are drawn from one stream (its seed's generator) wherever they are
sampled: a worker that continues a request whose earlier tokens were sampled elsewhere (the
decode worker after the prefill worker's first token; any worker after a re-prefill) first
`advance`s the generator past those draws. One multinomial draw over V probabilities consumes
the same random numbers whatever the probabilities are, so a draw over uniform weights of the
same size skips exactly one token's randomness (tests/unit/test_worker_actor.py checks the streams
match).

A request that asks for log-probabilities (SamplingParams.logprobs) gets, per sampled token, a
TokenLogprob computed from the same logits row (`take_logprob`); only steps with such rows copy
those values to the host as well.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.sequence import SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowFailure:
    """A row of a batch that could not be sampled. Only its own sequence fails; `message` is
    what its client is told (the cause, if any, is logged with the request id)."""

    message: str


# What one row's sampling came to, next to its token id in the one copy to the host of a step;
# of two outcomes the larger code is reported (a NaN row is reported as NaN, whatever the draw).
_OK, _EMPTY, _NAN = 0, 1, 2
# A log-probability of minus infinity (a token the model rules out) is reported as this: JSON has
# no infinity (OpenAI's API uses the same floor)
LOGPROB_FLOOR = -9999.0


class Sampler:
    """Samples on the device of the logits it is given, which must be `device` (its seeded
    generators live there: a CUDA generator draws other numbers than a CPU one from the same
    seed, so the workers that share a seeded request run on one kind of device).

    A step copies one thing to the host: the sampled token ids with each row's outcome, once
    (`sample`); no check in between waits for the device. Only a step with rows that asked for
    log-probabilities copies those as well, after it."""

    def __init__(self, device: torch.device | str = "cpu", token_text: Callable[[int], str] = str) -> None:
        """token_text: a token id's text (the tokenizer's decode of it alone), for TokenLogprob."""
        self.device = torch.device(device)
        self.token_text = token_text
        self._generators: dict[str, torch.Generator] = {}
        self._logprobs: dict[str, TokenLogprob] = {}

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request_id] = gen
        return gen

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._logprobs.pop(request_id, None)

    def take_logprob(self, request_id: str) -> TokenLogprob | None:
        """The log-probabilities of the token `sample` last drew for this request, once; None
        when it did not ask for them (or the row failed)."""
        return self._logprobs.pop(request_id, None)

    def advance(self, request_id: str, params: SamplingParams, vocab_size: int, draws: int) -> None:
        """Skip the random numbers of `draws` tokens this request sampled elsewhere (seeded,
        non-greedy requests only: the others draw nothing or from the global generator)."""
        if params.greedy or params.seed is None or draws <= 0:
            return
        gen = self._generator(request_id, params.seed)
        uniform = torch.ones(vocab_size, device=self.device)
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
        tokens = logits.argmax(dim=-1)  # [N]
        outcome = torch.isnan(logits).any(dim=-1).long() * _NAN  # [N]
        failed: dict[int, RowFailure] = {}
        for i, p in enumerate(params):
            if p.greedy:
                continue
            try:
                token, empty = self._draw(logits[i], request_ids[i], p)
            except Exception:
                log.exception("sampling request %s failed", request_ids[i])
                failed[i] = RowFailure("sampling failed for this request")
                continue
            tokens[i] = token
            outcome[i] = torch.maximum(outcome[i], empty.long() * _EMPTY)
        rows = torch.stack([tokens, outcome]).tolist()  # the step's one copy to the host
        out: list[int | RowFailure] = []
        for i, (token, why) in enumerate(zip(*rows)):
            p = params[i]
            if why == _NAN:
                out.append(RowFailure("the model produced invalid (NaN) scores for this request"))
            elif i in failed:
                out.append(failed[i])
            elif why == _EMPTY:
                out.append(
                    RowFailure(
                        f"sampling with temperature {p.temperature:g}, top_p {p.top_p:g}, top_k {p.top_k} "
                        "left no token to draw"
                    )
                )
            else:
                out.append(token)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None and not isinstance(out[i], RowFailure)]
        if wanted:
            try:
                self._record_logprobs(logits, wanted, out, request_ids, params)
            except Exception:
                log.exception("log-probabilities of a batch failed")
                for i in wanted:
                    out[i] = RowFailure("computing log-probabilities failed for this request")
        return out

    def _record_logprobs(
        self, logits: torch.Tensor, rows: list[int], tokens: list, request_ids: list[str], params: list[SamplingParams]
    ) -> None:
        """TokenLogprob of each row in `rows` (its sampled token, and its top k) into _logprobs."""
        index = torch.tensor(rows, device=logits.device)
        lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)  # [R, V]
        chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=logits.device)[:, None])
        k = max(params[i].logprobs or 0 for i in rows)
        top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        values = torch.cat([chosen, top_lp], dim=1).clamp(min=LOGPROB_FLOOR).tolist()  # one copy of the values
        ids = top_ids.tolist()
        text = self.token_text
        for r, i in enumerate(rows):
            n = params[i].logprobs or 0
            top = tuple((t, text(t), v) for t, v in zip(ids[r][:n], values[r][1 : n + 1]))
            self._logprobs[request_ids[i]] = TokenLogprob(tokens[i], text(tokens[i]), values[r][0], top)

    def _draw(self, logits: torch.Tensor, request_id: str, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, empty) as 0-d tensors on the logits' device, without waiting for it: `empty`
        is True when the filtered distribution has nothing to draw from (then `token` is a draw
        over all tokens alike, never used: a multinomial over such weights would fail, on CUDA
        with an error that breaks the device)."""
        row = logits.float() / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # drop a token once the mass before it already reaches top_p (the top token stays)
            drop = cum - torch.softmax(sorted_logits, dim=-1) >= p.top_p
            row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = torch.softmax(row, dim=-1)
        empty = ~(torch.isfinite(probs).all() & (probs.sum() > 0.0))
        probs = torch.where(empty, torch.ones_like(probs), probs)
        return torch.multinomial(probs, 1, generator=self._generator(request_id, p.seed))[0], empty
