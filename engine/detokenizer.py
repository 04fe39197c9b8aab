"""Incremental detokenization with stop strings.

With a fast tokenizer (a `tokenizers.Tokenizer` behind it, as every model the engine loads has),
each new token is decoded once by `tokenizers`' DecodeStream, which holds back a UTF-8 character
split across tokens until it is whole: the cost per token does not grow with the output
(`python -m bench.detokenizer`). Any other tokenizer is re-decoded from all output ids each step
(exact for any tokenizer, quadratic in the output's length). Either way only text that can no
longer change is released: a tail that could still become a stop string is held back until the
next token or the finish.

A resumed request (re-prefilled after its decode worker died, with its earlier output appended to
the prompt) passes that output as `prefix_ids` and the length of the text already delivered as
`released`: decoding continues over the whole output, so held-back text is delivered, a stop
string spanning the resume point is found, and a character split across it decodes whole.
"""

from __future__ import annotations


def _fast_backend(tokenizer):
    """The `tokenizers.Tokenizer` a transformers fast tokenizer wraps, or None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - transformers requires tokenizers
        return None
    return backend if isinstance(backend, Tokenizer) else None


class Detokenizer:
    def __init__(
        self,
        tokenizer,
        stop: tuple[str, ...],
        prefix_ids: list[int] = (),
        released: int = 0,
        incremental: bool = True,
    ) -> None:
        """incremental: decode each token once where the tokenizer allows (False: re-decode
        everything each step, the reference the bench compares against)."""
        self._tokenizer = tokenizer
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._prefix = list(prefix_ids)
        self.text = ""
        self._released = released
        self._backend = _fast_backend(tokenizer) if incremental else None
        self._stream = None
        self._fed = 0  # output ids already decoded (incremental)
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)
            self._feed(self._prefix)

    def _feed(self, ids) -> None:
        pieces = [self._stream.step(self._backend, int(i)) for i in ids]
        self.text += "".join(p for p in pieces if p)

    def update(self, output_ids: list[int], start: int = 0) -> tuple[str, bool]:
        """Decode after new tokens: the output is output_ids[start:] (a sequence's whole token
        list and its prompt length, so that nothing is copied per step); returns (newly
        released text, hit_stop_string)."""
        if self._stream is not None:
            self._feed(output_ids[start + self._fed :])
            self._fed = len(output_ids) - start
            text = self.text
        else:
            text = self._tokenizer.decode(self._prefix + list(output_ids[start:]), skip_special_tokens=True)
        for s in self._stop:
            at = text.find(s, max(0, self._released - len(s)))
            if at != -1:
                self.text = text[:at]
                return self._release(len(self.text)), True
        self.text = text
        end = len(text) - self._holdback
        while end > self._released and text[end - 1] == "\ufffd":
            end -= 1
        return self._release(end), False

    def flush(self) -> str:
        return self._release(len(self.text.rstrip("\ufffd")))

    def _release(self, end: int) -> str:
        if end <= self._released:
            return ""
        new = self.text[self._released : end]
        self._released = end
        return new
