"""Multi-turn sessions: the conversation the gateway keeps per (client, `session_id`).

A session's history is every message its finished turns sent plus the assistant replies:

    turn k:  client sends new messages M_k
             router gets history + M_k                      (history = M_1 R_1 ... M_k-1 R_k-1)
             on STOP / LENGTH: history += M_k + [assistant: R_k]
             on ABORT / ERROR: history unchanged (the turn never happened)

Sessions belong to the principal that made them: the store is keyed by (principal, session id),
so another client using the same id gets a separate, new conversation, never this one's history.

Bounds (SessionsConfig; sizes are text characters + image bytes), so that no client can push
out another's sessions or grow the store without limit:
- a session keeps at most `max_session_bytes` (each message counts MESSAGE_OVERHEAD more); its
  oldest turns go first (and if its system messages alone are larger, it keeps nothing);
- a principal keeps at most `max_sessions_per_client` sessions and `max_bytes_per_client`; past
  either it forgets its own least recently used sessions;
- the store keeps at most `max_sessions` and `max_bytes`; past the count the victim is the least
  recently used session of the principal holding the most sessions, past the bytes that of the
  principal holding the most bytes (ties: the one adding), so a client at or below its fair share
  is never evicted by another;
- a session idle for `ttl_s` is forgotten.
A forgotten or unknown session id simply starts a new conversation. Everything runs on the
gateway's event loop, so no locking is needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cluster.auth import Principal
from cluster.config import SessionsConfig
from cluster.router_api import ChatMessage


@dataclass
class _Session:
    messages: tuple[ChatMessage, ...]
    last_used: float
    size: int = 0


MESSAGE_OVERHEAD = 64  # bytes a message costs besides its text and images (so empty ones count too)


def _size(messages: tuple[ChatMessage, ...]) -> int:
    return sum(MESSAGE_OVERHEAD + len(m.content) + sum(len(i) for i in m.images) for m in messages)


class SessionStore:
    def __init__(self, config: SessionsConfig = SessionsConfig(), clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        # Per principal, that principal's sessions in last-used order (oldest first).
        self._sessions: dict[Principal, OrderedDict[str, _Session]] = {}
        self._bytes: dict[Principal, int] = {}
        self._count = 0
        self.total_bytes = 0

    def history(self, who: Principal, session_id: str) -> tuple[ChatMessage, ...]:
        """The session's messages so far (empty for a new, expired or evicted session)."""
        self._expire()
        session = self._sessions.get(who, {}).get(session_id)
        if session is None:
            return ()
        self._touch(who, session_id, session)
        return session.messages

    def append_turn(self, who: Principal, session_id: str, messages: tuple[ChatMessage, ...], reply: str) -> None:
        """Record a finished turn: the messages the client sent, then the assistant's reply."""
        self._expire()
        mine = self._sessions.setdefault(who, OrderedDict())
        session = mine.get(session_id)
        if session is None:
            session = mine[session_id] = _Session((), 0.0)
            self._count += 1
        self._set(
            who,
            session,
            _cap(
                session.messages + (*messages, ChatMessage(role="assistant", content=reply)),
                self.config.max_session_bytes,
            ),
        )
        self._touch(who, session_id, session)
        c = self.config
        while mine and (len(mine) > c.max_sessions_per_client or self._bytes[who] > c.max_bytes_per_client):
            self._drop(who, next(iter(mine)))
        while self._count > c.max_sessions:  # too many: the client holding the most sessions gives one up
            victim = max(self._sessions, key=lambda p: (len(self._sessions[p]), self._bytes[p], p == who))
            self._drop(victim, next(iter(self._sessions[victim])))
        while self.total_bytes > c.max_bytes:  # too large: the client holding the most bytes gives one up
            victim = max(self._sessions, key=lambda p: (self._bytes[p], len(self._sessions[p]), p == who))
            self._drop(victim, next(iter(self._sessions[victim])))

    def replace(
        self,
        who: Principal,
        session_id: str,
        messages: tuple[ChatMessage, ...],
        was: tuple[ChatMessage, ...] | None = None,
    ) -> None:
        """Overwrite a session's history (the gateway trims history that no longer fits); with
        `was`, only if the history is still that one (a turn recorded meanwhile is kept)."""
        session = self._sessions.get(who, {}).get(session_id)
        if session is not None and (was is None or session.messages is was):
            self._set(who, session, messages)

    def forget(self, who: Principal, session_id: str) -> bool:
        if session_id not in self._sessions.get(who, {}):
            return False
        self._drop(who, session_id)
        return True

    def count(self, who: Principal | None = None) -> int:
        self._expire()
        return self._count if who is None else len(self._sessions.get(who, ()))

    def __len__(self) -> int:
        return self.count()

    def _set(self, who: Principal, session: _Session, messages: tuple[ChatMessage, ...]) -> None:
        size = _size(messages)
        self._bytes[who] = self._bytes.get(who, 0) + size - session.size
        self.total_bytes += size - session.size
        session.messages, session.size = messages, size

    def _touch(self, who: Principal, session_id: str, session: _Session) -> None:
        session.last_used = self._clock()
        self._sessions[who].move_to_end(session_id)

    def _drop(self, who: Principal, session_id: str) -> None:
        mine = self._sessions[who]
        session = mine.pop(session_id)
        self._count -= 1
        self._bytes[who] -= session.size
        self.total_bytes -= session.size
        if not mine:
            del self._sessions[who], self._bytes[who]

    def _expire(self) -> None:
        # Each principal's sessions are in last-used order, so its expired ones are at the front.
        cutoff = self._clock() - self.config.ttl_s
        for who in list(self._sessions):
            mine = self._sessions[who]
            while mine:
                sid, session = next(iter(mine.items()))
                if session.last_used > cutoff:
                    break
                self._drop(who, sid)
                if who not in self._sessions:
                    break


def _drop_points(history: tuple[ChatMessage, ...]) -> list[int]:
    """How old turns are dropped: step k removes every non-system message before position
    points[k]. A step drops the oldest non-system message left and the assistant replies right
    after it (a history never starts with a dangling reply); system messages always stay."""
    points, p, n = [0], 0, len(history)
    while True:
        while p < n and history[p].role == "system":
            p += 1
        if p == n:
            return points
        p += 1
        while p < n and history[p].role == "assistant":
            p += 1
        points.append(p)


def _dropped(history: tuple[ChatMessage, ...], point: int) -> tuple[ChatMessage, ...]:
    return tuple(m for m in history[:point] if m.role == "system") + history[point:]


def _cap(messages: tuple[ChatMessage, ...], max_bytes: int) -> tuple[ChatMessage, ...]:
    """The history with its oldest turns dropped until it holds at most max_bytes."""
    size = _size(messages)
    if size <= max_bytes:
        return messages
    points = _drop_points(messages)
    dropped, at = 0, 0
    for point in points[1:]:
        dropped += _size(tuple(m for m in messages[at:point] if m.role != "system"))
        at = point
        if size - dropped <= max_bytes:
            break
    kept = _dropped(messages, at)
    return kept if _size(kept) <= max_bytes else ()  # system messages alone too large: keep nothing


def trim_to_fit(
    history: tuple[ChatMessage, ...],
    new: tuple[ChatMessage, ...],
    count_tokens: Callable[[tuple[ChatMessage, ...]], int],
    budget: int,
    estimate: Callable[[ChatMessage], int] | None = None,
) -> tuple[ChatMessage, ...]:
    """The history with its oldest turns dropped (see _drop_points) until history + new fits in
    `budget` tokens; all of them dropped if it never fits.

    System messages are kept; the new messages are never dropped (if they alone do not fit,
    the router rejects the request with a clear error). Templating a long conversation costs
    about as much as its text, so the whole of it is templated a few times, not once per message
    dropped: once to see whether it fits; if not, `estimate` (what one message adds, at most)
    says from the sums where to cut, then the cut conversation is templated, stepping from there
    to the first cut that fits (the estimate is within a message or two). Without `estimate`,
    each message is templated on its own (less an empty one of its role)."""
    whole = count_tokens((*history, *new))
    if whole <= budget:
        return history
    points = _drop_points(history)
    if estimate is None:
        empty = {role: count_tokens((ChatMessage(role, ""),)) for role in {m.role for m in history}}
        estimate = lambda m: count_tokens((m,)) - empty[m.role]  # noqa: E731
    own = [estimate(m) if m.role != "system" else 0 for m in history]
    excess, dropped, step = whole - budget, 0, 0
    while step + 1 < len(points) and dropped < excess:
        step += 1
        dropped += sum(own[points[step - 1] : points[step]])

    def fits(k: int) -> bool:
        return count_tokens((*_dropped(history, points[k]), *new)) <= budget

    # The count only shrinks as more is dropped: walk from the estimate to the first step that fits.
    if fits(step):
        while step > 1 and fits(step - 1):
            step -= 1
    else:
        while step + 1 < len(points) and not fits(step + 1):
            step += 1
        step = min(step + 1, len(points) - 1)
    return _dropped(history, points[step])
