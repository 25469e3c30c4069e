"""One JSON-over-HTTP exchange with a model server, for the clients that retry around it: the
reward-model client (``rewards.reward_model``) and the LLM judge (``evaluate.judge``).

:func:`exchange` sends one request and returns the decoded JSON answer, or raises
:class:`HTTPFailure` saying whether another attempt may succeed: a 5xx, a refused or broken
connection and a timeout may (a server restarting or busy); a 4xx (the server is up and
refused this request) and a 200 that is not JSON (not the server we think) may not. The
retry policy (budget, backoff, messages naming the user's setting) stays with each client.
Standard library only (``urllib``).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any, Optional


class HTTPFailure(Exception):
    """One failed attempt; ``retry`` says whether another attempt may succeed."""

    def __init__(self, message: str, retry: bool, status: Optional[int] = None):
        super().__init__(message)
        self.retry = retry
        self.status = status


def error_message(body: bytes) -> str:
    """The reason an error answer gives: a JSON ``{"error": "..."}`` (or OpenAI's
    ``{"error": {"message": ...}}``), else the start of the body."""
    try:
        payload = json.loads(body)
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    except ValueError:
        pass
    return body.decode("utf-8", "replace").strip()[:500] or "(empty body)"


def exchange(method: str, url: str, payload: Optional[dict], timeout_s: float,
             headers: Optional[dict] = None) -> Any:
    """One request (``payload`` as a JSON body, or none); the decoded JSON answer, or HTTPFailure."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as err:  # a status >= 400: the server is up and said why
        status = err.code
        raise HTTPFailure(f"HTTP {status}: {error_message(err.read())}", retry=status >= 500, status=status) from None
    except urllib.error.URLError as err:  # refused, unreachable, unknown host, connect timeout
        if isinstance(err.reason, TimeoutError):
            raise HTTPFailure(f"timed out after {timeout_s:g} s connecting", retry=True) from None
        raise HTTPFailure(f"cannot connect: {err.reason}", retry=True) from None
    except TimeoutError:  # connected, but the answer did not come in time
        raise HTTPFailure(f"timed out after {timeout_s:g} s waiting for the answer", retry=True) from None
    except (OSError, http.client.HTTPException) as err:  # reset or cut mid-answer (a restarting server)
        raise HTTPFailure(f"connection broke: {err!r}", retry=True) from None
    try:
        return json.loads(body)
    except ValueError:
        # A 200 that is not JSON is not the server we think (wrong port?): retrying cannot help.
        raise HTTPFailure(f"answered non-JSON: {body[:200]!r}", retry=False, status=200) from None
