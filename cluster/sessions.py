"""Multi-turn sessions: the conversation the gateway keeps per `session_id`.

A session's history is every message its finished turns sent plus the assistant replies:

    turn k:  client sends new messages M_k
             router gets history + M_k                      (history = M_1 R_1 ... M_k-1 R_k-1)
             on STOP / LENGTH: history += M_k + [assistant: R_k]
             on ABORT / ERROR: history unchanged (the turn never happened)

The store is bounded: at most `max_sessions` sessions (least recently used evicted first) and
a session idle for `ttl_s` is forgotten. A forgotten or unknown session id simply starts a new
conversation. Everything runs on the gateway's event loop, so no locking is needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cluster.router_api import ChatMessage


@dataclass
class _Session:
    messages: tuple[ChatMessage, ...]
    last_used: float


class SessionStore:
    def __init__(self, max_sessions: int = 1024, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        if max_sessions < 1 or ttl_s <= 0:
            raise ValueError(f"need max_sessions >= 1 and ttl_s > 0, got {max_sessions}, {ttl_s}")
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
        self._sessions: OrderedDict[str, _Session] = OrderedDict()

    def history(self, session_id: str) -> tuple[ChatMessage, ...]:
        """The session's messages so far (empty for a new, expired or evicted session)."""
        self._expire()
        session = self._sessions.get(session_id)
        if session is None:
            return ()
        session.last_used = self._clock()
        self._sessions.move_to_end(session_id)
        return session.messages

    def append_turn(self, session_id: str, messages: tuple[ChatMessage, ...], reply: str) -> None:
        """Record a finished turn: the messages the client sent, then the assistant's reply."""
        self._expire()
        turn = (*messages, ChatMessage(role="assistant", content=reply))
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session((), 0.0)
        session.messages = session.messages + turn
        session.last_used = self._clock()
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def replace(self, session_id: str, messages: tuple[ChatMessage, ...]) -> None:
        """Overwrite a session's history (the gateway trims history that no longer fits)."""
        if session_id in self._sessions:
            self._sessions[session_id].messages = messages

    def forget(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def __len__(self) -> int:
        self._expire()
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        self._expire()
        return session_id in self._sessions

    def _expire(self) -> None:
        # Sessions are kept in last-used order, so expired ones are at the front.
        cutoff = self._clock() - self.ttl_s
        while self._sessions:
            sid, session = next(iter(self._sessions.items()))
            if session.last_used > cutoff:
                break
            del self._sessions[sid]


def trim_to_fit(history: tuple[ChatMessage, ...], new: tuple[ChatMessage, ...],
                count_tokens: Callable[[tuple[ChatMessage, ...]], int], budget: int) -> tuple[ChatMessage, ...]:  # fmt: skip
    """Drop the oldest non-system history messages until history + new fits in `budget` tokens.

    System messages are kept; the new messages are never dropped (if they alone do not fit,
    the router rejects the request with a clear error). Returns the trimmed history.
    """
    kept = list(history)
    while kept and count_tokens((*kept, *new)) > budget:
        idx = next((i for i, m in enumerate(kept) if m.role != "system"), None)
        if idx is None:
            break
        del kept[idx]
        # Do not start the remaining history with a dangling assistant reply.
        while idx < len(kept) and kept[idx].role == "assistant":
            del kept[idx]
    return tuple(kept)
