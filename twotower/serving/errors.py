"""Errors the serving graph raises on purpose, each mapped to its own gRPC status by the
executor model (``twotower/serving/executor_model.py``): the client's mistake is
INVALID_ARGUMENT, a dependency that is down is UNAVAILABLE, anything else INTERNAL."""


class RequestError(ValueError):
    """The request breaks the serving contract (empty, too large, refused ids)."""


class ServiceUnavailable(RuntimeError):
    """A dependency of the graph (the online feature store) cannot be reached right now."""
