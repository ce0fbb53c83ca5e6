"""The whole agentd exception tree.

Foreign errors (transport, cryptography, OSError from the kernel) are translated at the boundary
where they happen and re-raised as one of these with ``raise X(...) from exc``. Whether an
upstream failure is worth retrying is a *type*, never a string match::

    AgentdError                      exit code 1 unless stated
    ├── ConfigError                  exit 2; .problems: every "file:line: key.path: message"
    ├── UsageError                   exit 2; bad command line
    ├── UpstreamError                talking to OpenBao/Vault failed; .status (HTTP or None)
    │   ├── TransientError           connect error, timeout, 5xx, 429, sealed, standby
    │   │                            (.retry_after: seconds or None): retry with backoff
    │   ├── AuthError                401/403, or a login that failed: log in again
    │   └── PermanentError           any other 4xx, malformed reply: retrying will not help
    │       ├── UpstreamNotFound     404: the path does not exist (evidence of deletion
    │       │   │                        once a second request confirms it)
    │       │   └── UpstreamDeleted      a KV v2 deletion or destroy marker: evidence at once
    │       ├── CheckFailed          a secret's ``check`` program refused a new value
    │       └── CertificateRejected  an issued certificate failed verification
    ├── CryptoError                  a sealed blob failed authentication or a key is unusable
    ├── UnsafePath                   a trusted file or directory could be changed by others
    │                                (.path, .reason); callers translate it to their own error
    ├── RenderError                  a template or bundle could not be rendered or written
    │                                (the last good file stays)
    ├── RequestError                 a client request failed; .code is the wire error code
    │   ├── BadRequest               "bad_request"
    │   ├── UnsupportedVersion       "unsupported_version"
    │   ├── UnknownOp                "unknown_op"
    │   ├── Forbidden                "forbidden"
    │   ├── NotFound                 "not_found"
    │   ├── Unavailable              "unavailable"
    │   ├── RateLimited              "rate_limited"
    │   ├── InternalError            "internal"
    │   └── FramingError             the byte stream is broken: reply with id nil, then close
    │       ├── FrameTooLarge        "too_large"
    │       └── MalformedFrame       "bad_request" (body is not a msgpack map)
    └── ClientError                  the client side of the socket (connect failed, EOF)

Messages never contain a secret value, a token or a secret_id.
"""

from __future__ import annotations

from collections.abc import Sequence


class AgentdError(Exception):
    """Base of every error agentd raises on purpose."""

    exit_code = 1


class ConfigError(AgentdError):
    """The configuration is invalid. ``problems`` holds every problem found, one line each."""

    exit_code = 2

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class UsageError(AgentdError):
    """The command line is wrong."""

    exit_code = 2


class UpstreamError(AgentdError):
    """A request to the upstream secret store failed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientError(UpstreamError):
    """A failure that may go away by itself: retry with backoff, serve stale meanwhile."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class AuthError(UpstreamError):
    """The token was refused (401/403) or a login failed."""


class PermanentError(UpstreamError):
    """The upstream refused the request for a reason retrying will not fix."""


class UpstreamNotFound(PermanentError):
    """The upstream answered 404 for the path."""


class UpstreamDeleted(UpstreamNotFound):
    """The upstream says the secret was deleted or destroyed (KV v2 version metadata)."""


class CheckFailed(PermanentError):
    """A secret's ``check`` program refused a new value (the old one stays served)."""


class CertificateRejected(PermanentError):
    """An issued certificate failed verification (the old pair stays served)."""


class CryptoError(AgentdError):
    """Sealed data failed authentication, or key material is unusable."""


class UnsafePath(AgentdError):
    """A file or directory agentd must trust can be changed by someone else, or is missing."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class GuardUnavailable(AgentdError):
    """The connect guard (decision 13) cannot run here: the message says why, in one line.
    Exit status 2 when ``connect_guard = "on"`` stops the start: restarting would not help."""

    exit_code = 2


class RenderError(AgentdError):
    """A template could not be rendered or written. The message never holds a secret value."""


class RequestError(AgentdError):
    """A request on the socket failed; ``code`` is the wire protocol's error code."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RequestError):
    code = "bad_request"


class UnsupportedVersion(RequestError):
    code = "unsupported_version"


class UnknownOp(RequestError):
    code = "unknown_op"


class Forbidden(RequestError):
    code = "forbidden"


class NotFound(RequestError):
    code = "not_found"


class Unavailable(RequestError):
    code = "unavailable"


class RateLimited(RequestError):
    code = "rate_limited"


class InternalError(RequestError):
    code = "internal"


class FramingError(RequestError):
    """The byte stream cannot be trusted any more: answer with id nil, then close."""


class FrameTooLarge(FramingError):
    code = "too_large"


class MalformedFrame(FramingError):
    code = "bad_request"


ERROR_CODES: dict[str, type[RequestError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnsupportedVersion,
        UnknownOp,
        Forbidden,
        NotFound,
        Unavailable,
        RateLimited,
        InternalError,
        FrameTooLarge,
    )
}


class ClientError(AgentdError):
    """The client could not talk to agentd (no socket, connection closed, bad reply)."""
