"""A small fault-injecting HTTP proxy for testing and benchmarking the client against a real server.

It forwards every request to ``upstream`` and, per request, with seeded probabilities, answers 429
(with ``Retry-After: 0``) or 500 instead, forwards but truncates the body (drops the connection half-way
through the promised ``Content-Length``), or forwards but empties the answer's text (a well-formed
response with a useless answer). Every request waits ``latency_s`` first. It counts what it saw.

With ``upstream=None`` it answers every forwarded request itself with a fixed chat completion
(``stub_content``): the benchmark uses that to measure the client alone, without the server's compute.

``sequence`` scripts the faults instead of drawing them: the n-th request gets ``sequence[n]`` (then
"ok"). Besides the drawn kinds it offers the hostile ones: "429_inf", "429_date", "429_huge" (a
Retry-After of inf, a date years away, 1e12 s), "echo_secrets" (a 500 whose text repeats the request's
Authorization header and Host), "odd_usage" (token counts of 1e400, -3 and "many"), "no_choices" (a
200 without choices), "null_message" (a choice whose message is null) and "not_json" (a 200 of text).

Run inside a thread with ``FaultProxy(...).start()`` / ``.stop()``, or as a context manager.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from dataclasses import dataclass, field

import httpx


@dataclass
class FaultCounts:
    received: int = 0
    forwarded: int = 0
    status_429: int = 0
    status_500: int = 0
    truncated: int = 0
    emptied: int = 0
    paths: dict[str, int] = field(default_factory=dict)


class FaultProxy:
    def __init__(self, upstream: str | None, *, p_429: float = 0.0, p_500: float = 0.0, p_truncate: float = 0.0,
                 p_empty: float = 0.0, latency_s: float = 0.0, seed: int = 0, host: str = "127.0.0.1",
                 sequence: list[str] | None = None, stub_content: str = "ok"):
        """upstream: server root such as ``http://127.0.0.1:8000`` (paths are forwarded unchanged)."""
        self.upstream = upstream.rstrip("/") if upstream else None
        self.p_429, self.p_500, self.p_truncate, self.p_empty = p_429, p_500, p_truncate, p_empty
        self.latency_s = latency_s
        self.sequence = list(sequence or [])
        self.stub_content = stub_content
        self.served: list[str] = []  # the fault each request got, in order
        self.counts = FaultCounts()
        self._rng = random.Random(seed)
        self._host = host
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fault-proxy")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        self._http = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=64))
        server = await asyncio.start_server(self._handle, self._host, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop_event.wait()
        await self._http.aclose()

    def _draw(self) -> str:
        if self.sequence:
            return self.sequence.pop(0)
        r = self._rng.random()
        for fault, p in (("429", self.p_429), ("500", self.p_500), ("truncate", self.p_truncate),
                         ("empty", self.p_empty)):
            if r < p:
                return fault
            r -= p
        return "ok"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: several requests per connection
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, value = line.decode("latin-1").split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.counts.received += 1
                self.counts.paths[path] = self.counts.paths.get(path, 0) + 1
                fault = self._draw()
                self.served.append(fault)
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                if fault in ("429", "500"):
                    setattr(self.counts, f"status_{fault}", getattr(self.counts, f"status_{fault}") + 1)
                    payload = b'{"error": {"message": "injected fault"}}'
                    reason = "Too Many Requests" if fault == "429" else "Internal Server Error"
                    writer.write(f"HTTP/1.1 {fault} {reason}\r\nContent-Type: application/json\r\n"
                                 f"Retry-After: 0\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
                    await writer.drain()
                    continue
                hostile = _hostile_answer(fault, headers)
                if hostile is not None:
                    writer.write(hostile)
                    await writer.drain()
                    continue
                forward_headers = {k: v for k, v in headers.items()
                                   if k in ("content-type", "authorization", "accept")}
                if self.upstream is None:
                    stub = json.loads(json.dumps(_STUB_COMPLETION))
                    stub["choices"][0]["message"]["content"] = self.stub_content
                    response = httpx.Response(200, json=stub)
                else:
                    response = await self._http.request(method, self.upstream + path, content=body,
                                                        headers=forward_headers)
                self.counts.forwarded += 1
                payload = response.content
                if fault == "empty" and response.status_code == 200:
                    self.counts.emptied += 1
                    payload = _emptied(payload)
                head = (f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n"
                        f"Content-Type: {response.headers.get('content-type', 'application/json')}\r\n"
                        f"Content-Length: {len(payload)}\r\n\r\n").encode()
                if fault == "truncate":
                    self.counts.truncated += 1
                    writer.write(head + payload[: len(payload) // 2])
                    await writer.drain()
                    return  # drop the connection mid-body
                writer.write(head + payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


def _answer(status: int, reason: str, payload: bytes, extra: str = "", content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{extra}"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def _hostile_answer(fault: str, headers: dict[str, str]) -> bytes | None:
    error = b'{"error": {"message": "slow down"}}'
    if fault in ("429_inf", "429_date", "429_huge"):
        after = {"429_inf": "inf", "429_date": "Fri, 31 Dec 2100 23:59:59 GMT", "429_huge": "1e12"}[fault]
        return _answer(429, "Too Many Requests", error, f"Retry-After: {after}\r\n")
    if fault == "echo_secrets":
        text = f"invalid credentials {headers.get('authorization', '')} for http://{headers.get('host', '')}/v1"
        return _answer(500, "Internal Server Error", json.dumps({"error": {"message": text}}).encode())
    if fault in ("odd_usage", "no_choices", "null_message"):
        body = json.loads(json.dumps(_STUB_COMPLETION))
        if fault == "odd_usage":
            payload = json.dumps(body).replace('"prompt_tokens": 1', '"prompt_tokens": 1e400')
            payload = payload.replace('"completion_tokens": 1', '"completion_tokens": "many"').replace('"total_tokens": 2', '"total_tokens": -3')
            return _answer(200, "OK", payload.encode())
        if fault == "no_choices":
            del body["choices"]
        else:
            body["choices"][0]["message"] = None
        return _answer(200, "OK", json.dumps(body).encode())
    if fault == "not_json":
        return _answer(200, "OK", b"<html>gateway</html>", content_type="text/html")
    return None


def _emptied(payload: bytes) -> bytes:
    data = json.loads(payload)
    for choice in data.get("choices", []):
        if isinstance(choice.get("message"), dict):
            choice["message"]["content"] = ""
        if "text" in choice:
            choice["text"] = ""
    return json.dumps(data).encode()


_STUB_COMPLETION = {
    "id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
    "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "ok"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
