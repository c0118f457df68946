"""Hub and network failures as one message and a hint (release.errors.hub_error), token never shown."""

from __future__ import annotations

import httpx
import pytest
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from release.errors import hub_error

TOKEN = "hf_secret_token_never_printed"


def http_error(status: int, cls=HfHubHTTPError):
    request = httpx.Request("POST", f"https://huggingface.co/api/models/o/n/commit/main?token={TOKEN}")
    return cls(f"{status} error for url {request.url}", response=httpx.Response(status, request=request))


@pytest.mark.parametrize(
    "status, message, hint",
    [
        (401, "the Hub rejected the token (401 Unauthorized) while committing on o/n", "set HF_TOKEN to a valid token"),
        (403, "the token is not allowed to do this (403 Forbidden) while committing on o/n", "write access"),
        (404, "not found (404) while committing on o/n", "check the repo id and the revision"),
        (429, "rate-limiting this token (429 Too Many Requests) while committing on o/n", "wait a few minutes"),
        (503, "the Hub failed with HTTP 503 while committing on o/n", "publish resumes where it stopped"),
        (418, "the Hub refused committing on o/n (HTTP 418)", None),
    ],
)
def test_http_failures_become_one_message_with_a_hint(status, message, hint):
    err = hub_error(http_error(status), "committing", "o/n", TOKEN)
    assert err is not None and message in err.message
    assert (hint in (err.hint or "")) if hint else err.hint is None
    assert TOKEN not in err.message + (err.hint or "")


def test_not_found_and_network_failures():
    repo = hub_error(http_error(404, RepositoryNotFoundError), "listing", "o/n", TOKEN)
    assert repo is not None and repo.message.startswith("repository o/n was not found (or the token cannot see it)")
    rev = hub_error(http_error(404, RevisionNotFoundError), "listing", "o/n", TOKEN)
    assert rev is not None and rev.message == "o/n has no such revision while listing"
    net = hub_error(httpx.ConnectError("connection refused"), "listing", "o/n (http://127.0.0.1:9)", TOKEN)
    assert net is not None and net.message.startswith("cannot reach the Hub at o/n (http://127.0.0.1:9) while listing")
    assert "HF_ENDPOINT" in (net.hint or "")
    assert hub_error(ValueError("not a Hub error"), "listing", "o/n", TOKEN) is None
