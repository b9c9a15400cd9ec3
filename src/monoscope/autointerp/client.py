"""A cost-controlled client for any OpenAI-compatible endpoint.

Everything that spends money or can fail lives here, so that explain/simulate only build prompts and
parse answers:

- a persistent response cache (SQLite, one row per answered request, committed as soon as it is
  answered and its answer parsed) keyed by everything the answer depends on (server URL, model,
  endpoint, request body): a rerun sends no request already answered, a crashed run resumes where it
  stopped, and an answer that did not parse is asked again rather than replayed;
- one writer per cache file: each autointerp job has its own file (``job_cache_path``), in SQLite's
  rollback-journal mode, because WAL mode needs shared memory that cluster file systems (NFS,
  Lustre) do not provide, and concurrent writers to one file there can corrupt it;
- a concurrency limit (asyncio semaphore) shared by every request of the run;
- retries with exponential backoff (and jitter) on 429, 5xx, timeouts, dropped connections and
  bodies that do not parse;
- a request/token budget: once spent, new requests fail with ``BudgetExceeded`` (cached answers are
  still served);
- usage accounting: requests sent, cache hits, retries, prompt and completion tokens.

The API key is read from the environment variable named in the config and handed to the ``openai``
client only; it is never part of a cache key, a cached row, a log line or ``usage()``. Credentials
in ``base_url`` and secrets an endpoint echoes in its error text are redacted (``redact``) before
any message leaves the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import math
import random
import re
import sqlite3
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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
    """The endpoint and retry keys of the ``autointerp`` config section (the schema holds their defaults)."""

    SECTION: ClassVar[str] = "autointerp"

    base_url: str
    model: str
    api_key_env: str  # name of the environment variable that holds the key; empty means "no key needed"
    concurrency: int
    max_retries: int
    backoff_s: float  # first retry waits about this long, doubling each time
    backoff_max_s: float
    timeout_s: float
    max_requests: int | None  # budget: requests actually sent (cache hits are free)
    max_total_tokens: int | None  # budget: prompt + completion tokens reported by the endpoint


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


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:api[-_]?key|key|token|access[-_]?token|secret|password|pass|sig|signature|auth)=)[^&;#\s\"']+")
_KEY_LIKE = re.compile(r"\b(?:sk|pk|rk|hf|gh[pousr]|xox[abp])[-_][A-Za-z0-9_\-]{6,}|(?i:bearer|basic)\s+[A-Za-z0-9._~+/=\-]{6,}")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """text with URL credentials, secret-looking query values, key-like tokens and `secrets` replaced by ***."""
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _SECRET_QUERY.sub(r"\1***", text)
    return _KEY_LIKE.sub("***", text)


def redact_url(url: str) -> str:
    """The URL without user:password@ and with secret-looking query values hidden."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return redact(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))


def url_secrets(url: str) -> tuple[str, ...]:
    parts = urllib.parse.urlsplit(url)
    values = [v for _, v in urllib.parse.parse_qsl(parts.query)]
    return tuple(v for v in (parts.password, parts.username, *values) if v)


def cache_key(base_url: str, model: str, endpoint: str, body: dict[str, Any]) -> str:
    """Everything the answer depends on: the same model name on another server is another model.
    The server is named by its redacted URL, so a rotated password in it keeps the answers."""
    server = redact_url(base_url).rstrip("/")
    canonical = json.dumps({"server": server, "model": model, "endpoint": endpoint, "body": body},
                           sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_cache_path(cache_path: str | Path, job: str) -> Path:
    """The cache file of one autointerp job: responses.sqlite -> responses-<job>.sqlite. One writer per file."""
    path = Path(cache_path)
    return path.with_name(f"{path.stem}-{job}{path.suffix or '.sqlite'}")


class ResponseCache:
    """SQLite table key -> (request, response) JSON; every put is committed at once (crash-safe).

    One process writes a file (see job_cache_path); rollback journal, not WAL, so the file is safe
    on a network file system with working locks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit; wait for a lock (another reader, a stray second run) rather than fail at once.
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, request TEXT NOT NULL, response TEXT NOT NULL)"
        )

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:
            return None  # a row that does not parse is no answer: ask again, and the put replaces it
        return value if isinstance(value, dict) else None

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM responses WHERE key = ?", (key,))

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


class _RedactingFilter(logging.Filter):
    """Rewrites a log record's message without the client's secrets: httpx, httpcore and openai log
    request URLs (with user:password@) and bodies at debug level, where a user may well turn them on."""

    def __init__(self, redact_text: Callable[[str], str]):
        super().__init__()
        self.redact_text = redact_text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_LIBRARY_LOGGERS = ("httpx", "httpcore", "openai")


def _library_loggers() -> list[logging.Logger]:
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in _LIBRARY_LOGGERS]
    return [logging.getLogger(n) for n in sorted(set(names) | set(_LIBRARY_LOGGERS))] + [log]


class LLMClient:
    """Async chat/completions calls with cache, concurrency limit, retries, budget and usage.

    Use as ``async with LLMClient(client_config, cache_path) as client: await client.chat(messages, ...)``.
    """

    def __init__(self, client_config: ClientConfig, cache_path: str | Path, *, rng_seed: int = 0):
        config = self.config = client_config
        self.cache = ResponseCache(cache_path)
        self.usage = Usage()
        self._semaphore = asyncio.Semaphore(config.concurrency)
        self._jitter = random.Random(rng_seed)
        self._inflight: dict[str, asyncio.Future] = {}
        self._openai: openai.AsyncOpenAI | None = None
        self._secrets = url_secrets(config.base_url)
        self._log_filter = _RedactingFilter(self.redact)
        for logger in _library_loggers():  # a filter acts only where the record is made: every logger
            logger.addFilter(self._log_filter)

    def redact(self, text: str) -> str:
        """text without this client's key, URL credentials, or key-like strings."""
        key = os.environ.get(self.config.api_key_env, "") if _ENV_NAME.fullmatch(self.config.api_key_env or "-") else ""
        return redact(text, (*self._secrets, key))

    def _api_key(self) -> str:
        name = self.config.api_key_env
        if not name:
            return PLACEHOLDER_KEY
        if not _ENV_NAME.fullmatch(name):
            # Never echo it: a value that is not a variable name is most likely the key itself.
            raise RuntimeError(
                f"autointerp.api_key_env must be the name of an environment variable (letters, digits, '_'), "
                f"not a key; the value given ({len(name)} characters) is not shown"
            )
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
        for logger in _library_loggers():
            logger.removeFilter(self._log_filter)

    async def chat(self, messages: list[dict[str, str]], parse: Callable[[dict], Any] | None = None, **params: Any) -> Any:
        """POST /chat/completions; returns the response as a plain dict, or parse(response) (cached)."""
        return await self.request("chat", {"messages": messages, **params}, parse)

    async def complete(self, prompt: str, parse: Callable[[dict], Any] | None = None, **params: Any) -> Any:
        """POST /completions (legacy); returns the response as a plain dict, or parse(response) (cached)."""
        return await self.request("completions", {"prompt": prompt, **params}, parse)

    async def request(self, endpoint: str, body: dict[str, Any], parse: Callable[[dict], Any] | None = None) -> Any:
        """The answer to one request, from the cache or the network; parse(response) when given.

        An answer is cached only once parse accepted it: one that does not parse (raises) is not
        kept, so a rerun asks again instead of replaying the same unusable answer forever."""
        parse = parse or (lambda response: response)
        key = cache_key(self.config.base_url, self.config.model, endpoint, body)
        cached = self._cache_get(key)
        if cached is not None:
            try:
                value = parse(cached)
            except Exception:  # noqa: BLE001 - cached by an older run before answers were parsed first
                self._cache_call(self.cache.delete, key)
            else:
                self.usage.cache_hits += 1
                return value
        # Identical requests issued concurrently share one network call.
        if key in self._inflight:
            self.usage.cache_hits += 1
            return parse(await asyncio.shield(self._inflight[key]))
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            response = await self._send_with_retries(endpoint, body)
        except BaseException as error:
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(error)
                future.exception()  # mark retrieved: nobody else may be waiting
            raise
        finally:
            del self._inflight[key]
        future.set_result(response)
        value = parse(response)  # raises before the answer is cached
        request = {"server": redact_url(self.config.base_url), "model": self.config.model, "endpoint": endpoint, **body}
        self._cache_call(self.cache.put, key, request, response)
        return value

    def _cache_get(self, key: str) -> dict[str, Any] | None:
        return self._cache_call(self.cache.get, key)

    def _cache_call(self, method, *args):
        """A cache failure (a locked or damaged file) costs a request, never the unit: log and go on."""
        try:
            return method(*args)
        except sqlite3.Error as error:
            self.usage.errors["cache"] = self.usage.errors.get("cache", 0) + 1
            log.warning("response cache %s: %s %s failed (%s); going on without it", self.cache.path,
                        method.__name__, key_prefix(args[0]), error)
            return None

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
                        raise RequestFailed(_short(self.redact(f"{type(error).__name__}: {error}"))) from None
                    self.usage.errors[kind] = self.usage.errors.get(kind, 0) + 1
                    last_reason = _short(self.redact(f"{kind}: {error}"))
                    retry_after = _retry_after(error)
                else:
                    self.usage.answered += 1
                    usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
                    self.usage.prompt_tokens += _token_count(usage.get("prompt_tokens"))
                    self.usage.completion_tokens += _token_count(usage.get("completion_tokens"))
                    return response
            if attempt < self.config.max_retries:
                self.usage.retries += 1
                delay = min(self.config.backoff_max_s, self.config.backoff_s * 2**attempt)
                # The server's Retry-After is honoured up to backoff_max_s: 'inf' or a date a year
                # away must not stall the run.
                delay = min(self.config.backoff_max_s, max(delay * (0.5 + self._jitter.random()), retry_after or 0.0))
                log.info("retrying %s request in %.2fs after %s", endpoint, delay, last_reason)
                await asyncio.sleep(delay)
        self.usage.failures += 1
        raise RequestFailed(f"gave up after {self.config.max_retries + 1} attempts; last error {last_reason}")

    def usage_dict(self) -> dict[str, Any]:
        return {"model": self.config.model, "base_url": redact_url(self.config.base_url), **self.usage.as_dict()}


def key_prefix(key: Any) -> str:
    return f"key {key[:12]}" if isinstance(key, str) else ""


def _token_count(value: Any) -> int:
    """A usage count as the endpoint reported it, or 0 when it is not a plain non-negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _retry_after(error: BaseException) -> float | None:
    response = getattr(error, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:  # the HTTP-date form
        import email.utils
        import time

        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


_COMMON_FIELDS = {"max_tokens", "temperature", "top_p", "seed", "stop", "n", "logprobs", "presence_penalty",
                  "frequency_penalty"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "top_logprobs", "response_format"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo"}
