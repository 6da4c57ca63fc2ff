"""Typed errors. The server maps each to one HTTP status in one place."""


class LoomError(Exception):
    """Base class of loom's own errors."""


class InvalidRequest(LoomError, ValueError):
    """The request is malformed or out of range; the caller can fix it (HTTP 400).

    `param` names the offending field, as in OpenAI's error body.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested tokens do not fit the model's context (HTTP 400)."""


class ModelLoadError(LoomError):
    """A checkpoint directory cannot be loaded: unknown architecture, missing or misshapen tensor."""


class EngineDeadError(LoomError):
    """The engine loop stopped and cannot serve requests (HTTP 503)."""


class RequestFailed(LoomError):
    """The engine failed while running this one request (the others went on): our fault, not the
    caller's (HTTP 500)."""


class NotFound(LoomError):
    """A named object (file, batch, agent run) does not exist (HTTP 404).

    `param` names the field or path segment that held the unknown id.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class StorageFull(LoomError):
    """The durable job state could not be written: the disk (or the --state-max-bytes quota) is full
    (HTTP 507). Whatever the failed write belonged to was rolled back; the queue is intact."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
