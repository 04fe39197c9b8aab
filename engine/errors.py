"""Errors the engine raises at its boundary. Each message names the problem and the value."""


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request (prompt or sampling parameters) the engine refuses; the message says why."""


class ModelNotFoundError(EngineError, FileNotFoundError):
    """The model path given does not exist or holds no loadable model."""


class OutOfKVCacheError(EngineError):
    """A single request needs more KV blocks than the whole cache has."""


class WorkerLoopDied(EngineError):
    """A worker's step loop died of an error no single request caused; the worker answers every
    later call with this until it is replaced (the supervisor kills and restarts it)."""
