"""The one exception type glmrel raises for problems a user can fix."""

from __future__ import annotations


class ReleaseError(Exception):
    """A problem with the user's input or environment, with an optional hint naming the fix.

    The CLI prints ``Error: <message>`` and ``Hint: <hint>`` and exits non-zero; library
    callers can catch this one type.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


def not_utf8(what: str, e: UnicodeDecodeError) -> str:
    """The message for a file that is not UTF-8 text: `what` (e.g. "manifest PATH") and the
    first byte that is not, with its offset."""
    return f"{what} is not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r})"


HUB_STATUS = {
    401: (
        "the Hub rejected the token (401 Unauthorized)",
        "set HF_TOKEN to a valid token (huggingface.co/settings/tokens) or run `hf auth login`",
    ),
    403: (
        "the token is not allowed to do this (403 Forbidden)",
        "use a token with write access to the repo (a fine-grained token needs write permission on it or its org)",
    ),
    404: ("not found (404)", "check the repo id and the revision, and that the token can see a private repo"),
    429: (
        "the Hub is rate-limiting this token (429 Too Many Requests)",
        "wait a few minutes and run the same command again",
    ),
}


def hub_error(e: BaseException, action: str, where: str, token: str | None = None) -> ReleaseError | None:
    """A huggingface_hub or network exception as one clear ReleaseError (None: not one of
    those). The token is never part of the message."""
    import httpx
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def clean(text: str) -> str:
        return text.replace(token, "***") if token else text

    if isinstance(e, RevisionNotFoundError):
        return ReleaseError(
            clean(f"{where} has no such revision while {action}"),
            hint="list its branches and tags with `hf repo-refs` (or publish first)",
        )
    if isinstance(e, RepositoryNotFoundError):
        return ReleaseError(
            clean(f"repository {where} was not found (or the token cannot see it) while {action}"),
            hint="check the repo id; for a private repo set HF_TOKEN to a token that can read it",
        )
    if isinstance(e, OfflineModeIsEnabled):
        return ReleaseError(f"cannot reach the Hub while {action}: HF_HUB_OFFLINE is set", hint="unset HF_HUB_OFFLINE")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in HUB_STATUS:
            what, hint = HUB_STATUS[status]
            return ReleaseError(clean(f"{what} while {action} on {where}"), hint=hint)
        if status is not None and status >= 500:
            return ReleaseError(
                f"the Hub failed with HTTP {status} while {action} on {where}",
                hint="the Hub is having trouble: run the same command again later (publish resumes where it stopped)",
            )
        return ReleaseError(clean(f"the Hub refused {action} on {where} (HTTP {status}): {e}"))
    if isinstance(e, httpx.TransportError):
        return ReleaseError(
            clean(f"cannot reach the Hub at {where} while {action} ({type(e).__name__}: {e})"),
            hint="check the network, any proxy, and HF_ENDPOINT",
        )
    return None
