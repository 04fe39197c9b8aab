"""Incremental detokenization with stop strings.

Text is re-decoded from all output ids (exact for any tokenizer), and only text that can no
longer change is released: a trailing U+FFFD (a UTF-8 character split across tokens) and a
tail that could still become a stop string are held back until the next token or the finish.

A resumed request (re-prefilled after its decode worker died, with its earlier output appended to
the prompt) passes that output as `prefix_ids` and the length of the text already delivered as
`released`: decoding continues over the whole output, so held-back text is delivered, a stop
string spanning the resume point is found, and a character split across it decodes whole.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...], prefix_ids: list[int] = (), released: int = 0) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._prefix = list(prefix_ids)
        self.text = ""
        self._released = released

    def update(self, output_ids: list[int]) -> tuple[str, bool]:
        """Decode after new tokens; returns (newly released text, hit_stop_string)."""
        text = self._tokenizer.decode(self._prefix + list(output_ids), skip_special_tokens=True)
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
