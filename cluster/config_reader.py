"""Reading a deploy document: the strict YAML loader, dotted overrides, and `Section`, the typed
field reader the loader (cluster/config.py) validates each mapping with.

Invariants: every reader method either returns a value of the promised type within the promised
bounds or raises `ConfigError` naming the source, the dotted field path and what was expected;
`Section.done()` refuses every key that no reader asked for, suggesting the closest known key.
Nothing here knows the schema's fields.
"""

from __future__ import annotations

import copy
import difflib
import enum
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NoReturn

import yaml


class ConfigError(ValueError):
    """Invalid deploy config. `source` is the file (or name), `path` the dotted field path."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        super().__init__(f"{source}: {path}: {reason}" if path else f"{source}: {reason}")
        self.source, self.path, self.reason = source, path, reason


class Section:
    """One mapping of the document being validated; remembers which keys were read so that
    `done()` can reject the rest as unknown."""

    def __init__(self, data: Any, path: str, source: str) -> None:
        self.path, self.source = path, source
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(source, path or "<top level>", f"expected a mapping, got {kind(data)}")
        self.data: Mapping[str, Any] = data
        self._known: list[str] = []

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, reason: str) -> NoReturn:
        raise ConfigError(self.source, self._where(key), reason)

    def _get(self, key: str, required: bool = False) -> tuple[bool, Any]:
        self._known.append(key)
        if key not in self.data:
            if required:
                self.fail(key, "required field is missing")
            return False, None
        return True, self.data[key]

    def section(self, key: str) -> Section:
        _, value = self._get(key)
        return Section(value, self._where(key), self.source)

    def done(self) -> None:
        for key in self.data:
            if key not in self._known:
                close = difflib.get_close_matches(str(key), self._known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(str(key), f"unknown key{hint}; allowed keys: {', '.join(self._known)}")

    def int(
        self,
        key: str,
        default: Any = None,
        *,
        required: bool = False,
        lo: int | None = None,
        hi: int | None = None,
        nullable: bool = False,
    ) -> Any:
        present, v = self._get(key, required)
        if not present or (v is None and nullable):
            return default if not present else None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"expected an integer{' or null' if nullable else ''}, got {kind(v)}")
        self._range(key, v, lo, hi, what="an integer")
        return v

    def float(
        self, key: str, default: float, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False
    ) -> float:
        present, v = self._get(key)
        if not present:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(key, f"expected a number, got {kind(v)}")
        self._range(key, v, lo, hi, lo_open, what="a number")
        return float(v)

    def _range(
        self, key: str, v: float, lo: float | None, hi: float | None, lo_open: bool = False, what: str = "a value"
    ) -> None:
        bounds = [f"> {lo}" if lo_open else f">= {lo}"] if lo is not None else []
        bounds += [f"<= {hi}"] if hi is not None else []
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            self.fail(key, f"expected {what} {' and '.join(bounds)}, got {v}")

    def str(self, key: str, default: Any, *, nullable: bool = False) -> Any:
        present, v = self._get(key)
        if not present or (v is None and nullable):
            return default if not present else None
        if not isinstance(v, str) or not v:
            self.fail(key, f"expected a non-empty string{' or null' if nullable else ''}, got {kind(v)}")
        return v

    def bool(self, key: str, default: bool) -> bool:
        present, v = self._get(key)
        if present and not isinstance(v, bool):
            self.fail(key, f"expected true or false, got {kind(v)}")
        return v if present else default

    def enum(self, key: str, cls: type[enum.Enum], default: Any) -> Any:
        present, v = self._get(key)
        if not present:
            return default
        allowed = [m.value for m in cls]
        if v not in allowed:
            close = difflib.get_close_matches(str(v), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(key, f"expected one of {' | '.join(allowed)}, got {v!r}{hint}")
        return cls(v)

    def resources(self, key: str, default: Mapping[str, float]) -> Mapping[str, float]:
        present, v = self._get(key)
        if not present:
            return default
        if v is None:
            v = {}
        if not isinstance(v, Mapping):
            self.fail(key, f"expected a mapping of Ray resource name to amount, got {kind(v)}")
        out = {}
        for name, amount in v.items():
            if not isinstance(name, str) or not name:
                self.fail(key, f"resource names must be non-empty strings, got {name!r}")
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                self.fail(f"{key}.{name}", "reserved Ray resource; use num_cpus / num_gpus")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
                self.fail(f"{key}.{name}", f"expected a number >= 0, got {kind(amount)}")
            out[name] = amount
        return MappingProxyType(out)


def kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"number {v}"
    if isinstance(v, str):
        return f"string {v!r}"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return type(v).__name__


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def apply_overrides(data: Any, overrides: Mapping[str, Any], source: str) -> dict:
    """Copy of `data` with each dotted path in `overrides` set (creating sections as needed)."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, "<top level>", f"expected a mapping, got {kind(data)}")
    out = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(source, dotted, f"override crosses non-mapping field {part!r}")
            node = child
        node[last] = value
    return out
