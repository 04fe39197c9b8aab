"""Incremental detokenization with stop strings.

Text is re-decoded from all output ids (exact for any tokenizer), and only text that can no
longer change is released: a trailing U+FFFD (a UTF-8 character split across tokens) and a
tail that could still become a stop string are held back until the next token or the finish.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._released = 0

    def update(self, output_ids: list[int]) -> tuple[str, bool]:
        """Decode after new tokens; returns (newly released text, hit_stop_string)."""
        text = self._tokenizer.decode(output_ids, skip_special_tokens=True)
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
        new = self.text[self._released:end]
        self._released = end
        return new
