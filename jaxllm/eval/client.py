"""A minimal client for any OpenAI-compatible chat endpoint (ours, vLLM, OpenAI itself), with retries.

Standard library only, so the judge and self-instruct need no extra package. Transient failures (connection
errors, timeouts, 408, 409, 429, 5xx) are retried with exponential backoff and jitter; other 4xx errors are
the request's fault and raise `ClientError` at once.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class ClientError(RuntimeError):
    """The endpoint refused the request (or kept failing after all retries)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ChatClient:
    """`ChatClient(base_url, model).chat(messages) -> str`.

    base_url ends in /v1 (e.g. http://127.0.0.1:8000/v1). The API key is read from the environment variable
    named by api_key_env (default OPENAI_API_KEY); a local server needs none."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 300.0,
                 max_retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout = model, timeout
        self.api_key = os.environ.get(api_key_env, "")
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.calls = 0                      # HTTP requests made (tests count them to check resuming)

    def chat(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int | None = None, **extra) -> str:
        """The first choice's text."""
        return self.complete(messages, temperature=temperature, max_tokens=max_tokens, **extra)[0]

    def complete(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int | None = None,
                 **extra) -> tuple[str, str | None]:
        """(text, finish_reason) of the first choice; extra fields (top_p, stop, seed, ...) go in the body."""
        body = {"model": self.model, "messages": messages, "temperature": temperature, **extra}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        response = self._post(body)
        try:
            choice = response["choices"][0]
            return choice["message"]["content"] or "", choice.get("finish_reason")
        except (KeyError, IndexError, TypeError):
            raise ClientError(f"{self.url}: unexpected response shape: {str(response)[:300]}") from None

    def _post(self, body: dict) -> dict:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            self.calls += 1
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500]
                if e.code not in RETRY_STATUS:
                    raise ClientError(f"{self.url}: HTTP {e.code}: {detail}", e.code) from None
                error = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt == self.max_retries:
                raise ClientError(f"{self.url}: giving up after {attempt + 1} attempts; last error: {error}")
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * (0.5 + random.random() / 2)
            log.warning("%s: %s; retrying in %.1fs (attempt %d of %d)", self.url, error, delay, attempt + 1,
                        self.max_retries)
            time.sleep(delay)
        raise AssertionError("unreachable")
