"""Errors the engine raises at its boundary. Each message names the problem and the value."""

import enum


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class SettingError(ValueError):
    """A field of an engine settings object (`owner`, e.g. SparsePrefillConfig) out of its
    domain; `field` names it, `reason` says why (the deploy config reports both at the YAML key)."""

    owner = "settings"

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{self.owner}.{field}: {reason}")
        self.field, self.reason = field, reason

    @classmethod
    def coerce_enum(cls, settings: object, field: str, kind: type[enum.Enum]) -> None:
        """Set a frozen settings object's `field` to its value as a member of `kind`, or raise
        this error listing the values it takes."""
        value = getattr(settings, field)
        try:
            object.__setattr__(settings, field, kind(value))
        except ValueError:
            raise cls(field, f"{value!r} is not one of {[m.value for m in kind]}") from None


class InvalidRequestError(EngineError, ValueError):
    """A request (prompt or sampling parameters) the engine refuses; the message says why and
    `field` names the parameter at fault, when one is (an API error's `param`)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelNotFoundError(EngineError, FileNotFoundError):
    """The model path given does not exist or holds no loadable model."""


class OutOfKVCacheError(EngineError):
    """A single request needs more KV blocks than the whole cache has."""


class WorkerLoopDied(EngineError):
    """A worker's step loop died of an error no single request caused; the worker answers every
    later call with this until it is replaced (the supervisor kills and restarts it)."""


class WorkerBroken(EngineError):
    """The worker itself is broken, not one request: its accelerator failed, or every sequence of
    several batches in a row failed on its own. Raised out of the step so that the worker's loop
    dies and the worker is replaced (no request's own fault is ever turned into this)."""


BROKEN_AFTER = 3  # batches in a row of >= 2 sequences in which every one failed on its own


def is_device_failure(exc: BaseException) -> bool:
    """An accelerator error (CUDA and kin): the device's state is lost for every request."""
    import torch

    return isinstance(exc, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(exc)
