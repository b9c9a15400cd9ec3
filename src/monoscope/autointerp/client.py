"""A cost-controlled client for any OpenAI-compatible endpoint.

Everything that spends money or can fail lives here, so that explain/simulate only build prompts and
parse answers:

- a persistent response cache (SQLite, one row per answered request, committed as soon as it is
  answered) keyed by (model, endpoint, request body): a rerun sends no request already answered and a
  crashed run resumes where it stopped;
- a concurrency limit (asyncio semaphore) shared by every request of the run;
- retries with exponential backoff (and jitter) on 429, 5xx, timeouts, dropped connections and
  bodies that do not parse;
- a request/token budget: once spent, new requests fail with ``BudgetExceeded`` (cached answers are
  still served);
- usage accounting: requests sent, cache hits, retries, prompt and completion tokens.

The API key is read from the environment variable named in the config and handed to the ``openai``
client only; it is never part of a cache key, a cached row, a log line or ``usage()``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

log = logging.getLogger(__name__)

# Local servers (llama.cpp, vLLM without --api-key) accept any key, but the openai client insists on one.
PLACEHOLDER_KEY = "sk-no-key-required"


class BudgetExceeded(RuntimeError):
    """The configured request or token budget is spent."""


class RequestFailed(RuntimeError):
    """A request still failed after every retry; the message says why (never includes the key)."""


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    model: str
    # Name of the environment variable that holds the key; empty means "no key needed".
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    backoff_s: float = 1.0  # first retry waits about this long, doubling each time
    backoff_max_s: float = 30.0
    timeout_s: float = 60.0
    max_requests: int | None = None  # budget: requests actually sent (cache hits are free)
    max_total_tokens: int | None = None  # budget: prompt + completion tokens reported by the endpoint


@dataclass
class Usage:
    requests: int = 0  # requests sent over the network, retries included
    answered: int = 0  # requests that got a usable answer from the network
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "answered": self.answered,
            "cache_hits": self.cache_hits,
            "retries": self.retries,
            "failures": self.failures,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "errors": dict(sorted(self.errors.items())),
        }


def cache_key(model: str, endpoint: str, body: dict[str, Any]) -> str:
    canonical = json.dumps({"model": model, "endpoint": endpoint, "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    """SQLite table key -> (request, response) JSON; every put is committed at once (crash-safe)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit; several Snakemake jobs may share the file, so wait for its lock rather than fail.
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, request TEXT NOT NULL, response TEXT NOT NULL)"
        )

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO responses (key, request, response) VALUES (?, ?, ?)",
            (key, json.dumps(request, ensure_ascii=False), json.dumps(response, ensure_ascii=False)),
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def _error_kind(error: BaseException) -> str | None:
    """A short name for a retryable error, or None when retrying cannot help (400, 401, 404...)."""
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection"
    if isinstance(error, openai.RateLimitError):
        return "429"
    if isinstance(error, openai.APIStatusError):
        return f"{error.status_code}" if error.status_code >= 500 else None
    if isinstance(error, (json.JSONDecodeError, httpx.HTTPError, openai.APIResponseValidationError)):
        return "bad_body"
    return None


class LLMClient:
    """Async chat/completions calls with cache, concurrency limit, retries, budget and usage.

    Use as ``async with LLMClient(config, cache_path) as client: await client.chat(messages, ...)``.
    """

    def __init__(self, config: ClientConfig, cache_path: str | Path, *, rng_seed: int = 0):
        if config.concurrency < 1:
            raise ValueError(f"autointerp.concurrency must be >= 1, got {config.concurrency}")
        self.config = config
        self.cache = ResponseCache(cache_path)
        self.usage = Usage()
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._jitter = random.Random(rng_seed)
        self._inflight: dict[str, asyncio.Future] = {}
        self._openai: openai.AsyncOpenAI | None = None

    def _api_key(self) -> str:
        name = self.config.api_key_env
        if not name:
            return PLACEHOLDER_KEY
        value = os.environ.get(name)
        if value is None:
            if self.config.base_url.startswith(("http://127.0.0.1", "http://localhost")):
                return PLACEHOLDER_KEY
            raise RuntimeError(
                f"autointerp.api_key_env names the environment variable {name!r}, which is not set"
            )
        return value

    def _client(self) -> openai.AsyncOpenAI:
        if self._openai is None:
            self._openai = openai.AsyncOpenAI(
                base_url=self.config.base_url,
                api_key=self._api_key(),
                max_retries=0,  # retries are ours: counted, budgeted and backed off per config
                timeout=self.config.timeout_s,
                http_client=httpx.AsyncClient(
                    limits=httpx.Limits(max_connections=self.config.concurrency + 4),
                    timeout=self.config.timeout_s,
                ),
            )
        return self._openai

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._openai is not None:
            await self._openai.close()
            self._openai = None
        self.cache.close()

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        """POST /chat/completions; returns the response as a plain dict (cached)."""
        return await self.request("chat", {"messages": messages, **params})

    async def complete(self, prompt: str, **params: Any) -> dict[str, Any]:
        """POST /completions (legacy); returns the response as a plain dict (cached)."""
        return await self.request("completions", {"prompt": prompt, **params})

    async def request(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        key = cache_key(self.config.model, endpoint, body)
        cached = self.cache.get(key)
        if cached is not None:
            self.usage.cache_hits += 1
            return cached
        # Identical requests issued concurrently share one network call.
        if key in self._inflight:
            self.usage.cache_hits += 1
            return await asyncio.shield(self._inflight[key])
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            response = await self._send_with_retries(endpoint, body)
            self.cache.put(key, {"model": self.config.model, "endpoint": endpoint, **body}, response)
            future.set_result(response)
            return response
        except BaseException as error:
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)
                future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]

    def _check_budget(self) -> None:
        cfg = self.config
        if cfg.max_requests is not None and self.usage.requests >= cfg.max_requests:
            raise BudgetExceeded(f"request budget of {cfg.max_requests} spent")
        spent = self.usage.prompt_tokens + self.usage.completion_tokens
        if cfg.max_total_tokens is not None and spent >= cfg.max_total_tokens:
            raise BudgetExceeded(f"token budget of {cfg.max_total_tokens} spent ({spent} used)")

    async def _send_once(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        # Fields the openai client does not know (vLLM's prompt_logprobs, llama.cpp extras) go in extra_body.
        known = _CHAT_FIELDS if endpoint == "chat" else _COMPLETION_FIELDS
        kwargs = {k: v for k, v in body.items() if k in known}
        extra = {k: v for k, v in body.items() if k not in known}
        api = self._client().chat.completions if endpoint == "chat" else self._client().completions
        response = await api.create(model=self.config.model, extra_body=extra or None, **kwargs)
        return response.model_dump(mode="json", exclude_unset=True)

    async def _send_with_retries(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        last_reason = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            async with self._semaphore:
                self._check_budget()
                self.usage.requests += 1
                try:
                    response = await self._send_once(endpoint, body)
                except Exception as error:  # noqa: BLE001 — classified below; unknown kinds re-raise
                    kind = _error_kind(error)
                    if kind is None:
                        self.usage.failures += 1
                        raise RequestFailed(f"{type(error).__name__}: {_short(error)}") from None
                    self.usage.errors[kind] = self.usage.errors.get(kind, 0) + 1
                    last_reason = f"{kind}: {_short(error)}"
                    retry_after = _retry_after(error)
                else:
                    self.usage.answered += 1
                    usage = response.get("usage") or {}
                    self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                    self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
                    return response
            if attempt < self.config.max_retries:
                self.usage.retries += 1
                delay = min(self.config.backoff_max_s, self.config.backoff_s * 2**attempt)
                delay = max(delay * (0.5 + self._jitter.random()), retry_after or 0.0)
                log.info("retrying %s request in %.2fs after %s", endpoint, delay, last_reason)
                await asyncio.sleep(delay)
        self.usage.failures += 1
        raise RequestFailed(f"gave up after {self.config.max_retries + 1} attempts; last error {last_reason}")

    def usage_dict(self) -> dict[str, Any]:
        return {"model": self.config.model, "base_url": self.config.base_url, **self.usage.as_dict()}


def _short(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _retry_after(error: BaseException) -> float | None:
    response = getattr(error, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


_COMMON_FIELDS = {"max_tokens", "temperature", "top_p", "seed", "stop", "n", "logprobs", "presence_penalty",
                  "frequency_penalty"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "top_logprobs", "response_format"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo"}
