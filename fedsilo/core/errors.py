"""Exceptions of the coordinator's plain functions; servicers map them to gRPC status codes."""


class FedsiloError(Exception):
    """Base class: every subclass maps to exactly one gRPC status code."""


class InvalidArgument(FedsiloError):
    """Malformed input: bad shape, dtype, NaN, truncated stream, out-of-range field."""


class FailedPrecondition(FedsiloError):
    """Valid input at the wrong time: closed or future round, run not running, budget spent."""


class PermissionDenied(FedsiloError):
    """Authenticated caller that is not allowed: silo not enrolled, wrong role."""


class Unauthenticated(FedsiloError):
    """No usable identity (no client certificate)."""


class AlreadyExists(FedsiloError):
    """A second upload for a round the silo already contributed to."""


class NotFound(FedsiloError):
    """A round or object that does not exist."""


class ResourceExhausted(FedsiloError):
    """A payload or chunk beyond the configured limit, or a caller beyond the calls it may hold at once."""


class Cancelled(FedsiloError):
    """A call that ended before it was complete: the client cancelled it, or the coordinator cut it as stalled."""
