"""Interactive neuroscope: a local web app that shows a unit's activation on every token of typed text.

The model, tokenizer and dictionary load once at start; each request tokenizes the text, runs the model
to the hook and encodes with the dictionary. Listens on 127.0.0.1 only, and answers only requests whose
Host is a loopback name and whose Origin (when sent) is this server: a web page the user visits cannot
post to it, nor read it through a DNS-rebinding name. Endpoints:
    GET  /                      the page (type text, pick a unit)
    POST /api/activations       {"text": str, "unit": int | null} -> tokens, the unit's activations, top units
    GET  /assets/..., /browser/...  the browser's assets, and the static browser when it has been built
"""

from __future__ import annotations

import errno
import html
import json
import math
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from monoscope.config import NEURONS
from monoscope.dictionary import open_dictionary
from monoscope.layout import Layout

ASSETS = Path(__file__).parent / "site_assets"
MAX_TEXT_CHARS = 20_000
MAX_BODY_BYTES = 4 * MAX_TEXT_CHARS + 1000  # a JSON string escapes a character to at most 6 bytes, mostly 1
MAX_JSON_DEPTH = 8  # the request is a flat object; anything nested deeper is refused before parsing
SOCKET_TIMEOUT_S = 10  # a client that stops sending mid-request frees its thread after this
MAX_CONCURRENT_REQUESTS = 16  # threads at once; further connections are answered 503 at once
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class RequestError(ValueError):
    """A bad request: answered with its HTTP status and message."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


class Neuroscope:
    """The loaded model, tokenizer and dictionary; `activations` is the whole computation."""

    def __init__(self, model: dict[str, Any], hook: str, results: Layout, name: str):
        """model: the `model` config section; hook: the hooked activation's full name; name: a dictionary in results."""
        from monoscope import models, pretrained, tokenize

        self.name, self.hook = name, hook
        self.tokenizer = tokenize.load_tokenizer(results.tokenizer_dir)
        self.strings = tokenize.token_strings(results.tokenizer_dir)
        self.bridge = models.load_model(model, results.model_dir)
        self.context = self.bridge.cfg.n_ctx
        self.device = next(self.bridge.parameters()).device
        probe = pretrained.run_to_hook(self.bridge, torch.zeros(1, 1, dtype=torch.long), self.hook)
        sae_dir = None if name == NEURONS else results.sae_dir(name)
        if sae_dir is not None and not results.sae_checkpoint(name)["cfg"].exists():
            raise FileNotFoundError(f"no SAE '{name}' in {results.sae_root} (expected {results.sae_checkpoint(name)['cfg']})")
        self.dictionary = open_dictionary(name, sae_dir, probe.shape[-1], self.device)
        if sae_dir is not None:
            check_provenance(self.dictionary.cfg.source_attrs, self.hook, models.model_identity(model, results.model_dir), name)
        self.d_sae = self.dictionary.d_sae
        self.lock = threading.Lock()  # one forward pass at a time: the model is shared

    @torch.no_grad()
    def activations(self, text: str, unit: int | None, n_top: int = 10) -> dict[str, Any]:
        from monoscope import pretrained

        if not isinstance(text, str) or not text:
            raise ValueError("'text' must be a non-empty string")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"'text' is longer than {MAX_TEXT_CHARS} characters")
        # type() not isinstance(): True is an int to Python, and f[:, True] would be the whole matrix.
        if unit is not None and not (type(unit) is int and 0 <= unit < self.d_sae):
            raise ValueError(f"'unit' must be an integer in [0, {self.d_sae}) for dictionary '{self.name}'")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        truncated = len(ids) > self.context
        ids = ids[: self.context]
        with self.lock:
            acts = pretrained.run_to_hook(self.bridge, torch.tensor([ids], device=self.device), self.hook)
            f = self.dictionary.encode(acts.float())[0].cpu()  # [s, d_sae]
        peak = f.max(0).values  # [d_sae]
        top = peak.topk(min(n_top, self.d_sae))
        return {
            "dictionary": self.name,
            "tokens": [self.strings[t] for t in ids],
            "unit": unit,
            "activations": [_finite_or_none(v) for v in f[:, unit].tolist()] if unit is not None else None,
            "top_units": [[int(u), _finite_or_none(float(v))] for u, v in zip(top.indices, top.values)],
            "truncated_to": self.context if truncated else None,
        }


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or inf: a non-finite activation is shown as missing (null), not as invalid JSON."""
    return value if math.isfinite(value) else None


def check_provenance(source_attrs: dict[str, Any], hook: str, model_id: str, name: str) -> None:
    """An SAE trained on another hook or model of the same width would load and show wrong numbers."""
    recorded_hook, recorded_model = source_attrs.get("hook"), source_attrs.get("model_id")
    if recorded_hook is not None and recorded_hook != hook:
        raise ValueError(f"SAE '{name}' was trained on hook {recorded_hook}, but the config's hook is {hook}")
    if recorded_model is not None and recorded_model != model_id:
        raise ValueError(f"SAE '{name}' was trained on model {recorded_model}, but the config's model is {model_id}")


def _json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether brackets nest deeper than limit (outside strings): json.loads would recurse on them."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>monoscope neuroscope: {name}</title>
<link rel="stylesheet" href="/assets/style.css"><script src="/assets/browser.js"></script></head><body>
<h1>Neuroscope · {name}</h1>
<p class="muted">Type or paste text, pick a {kind} (0–{last}), and see its activation on every token.
<a href="/browser/{name}/index.html">Browse all {kind}s</a></p>
<textarea id="text">def add(x, y):\n    # the sum\n    return x + y\n</textarea>
<p><label>{kind} <input id="unit" type="number" min="0" max="{last}" value="0"></label>
<button id="run">Show activations</button> <span id="status" class="muted"></span></p>
<div id="result" class="example"></div><h2>Most active {kind}s on this text</h2><div id="top"></div>
<script>
async function run() {{
  const status = document.getElementById("status");
  status.textContent = "…";
  const response = await fetch("/api/activations", {{method: "POST", headers: {{"Content-Type": "application/json"}},
    body: JSON.stringify({{text: document.getElementById("text").value, unit: parseInt(document.getElementById("unit").value, 10)}})}});
  const data = await response.json();
  if (!response.ok) {{ status.textContent = data.error; return; }}
  const scale = Math.max(1e-6, ...data.activations);
  document.getElementById("result").replaceChildren(renderTokens(data.tokens, data.activations, scale, -1));
  document.getElementById("top").replaceChildren(...data.top_units.map(([u, v]) => {{
    const link = el("a", {{href: "#"}}, `{kind} ${{u}}`);
    link.addEventListener("click", event => {{ event.preventDefault(); document.getElementById("unit").value = u; run(); }});
    return el("div", {{}}, link, ` max ${{fmt(v)}}`);
  }}));
  status.textContent = `max ${{fmt(Math.max(...data.activations))}}` + (data.truncated_to ? ` (first ${{data.truncated_to}} tokens)` : "");
  document.body.dataset.ready = "1";
}}
document.getElementById("run").addEventListener("click", run);
</script></body></html>
"""


def make_handler(scope: Neuroscope, browser_dir: Path):
    page = PAGE.format(name=html.escape(scope.name), kind="neuron" if scope.name == NEURONS else "feature", last=scope.d_sae - 1)

    class Handler(BaseHTTPRequestHandler):
        timeout = SOCKET_TIMEOUT_S  # StreamRequestHandler sets it on the socket: no thread waits forever

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, value: Any) -> None:
            self._send(status, json.dumps(value, allow_nan=False).encode(), "application/json")

        def _check_origin(self) -> None:
            """Loopback Host with this server's port, and no foreign Origin (DNS rebinding, cross-site posts)."""
            port = self.server.server_address[1]
            allowed = {f"{host}:{port}" for host in LOOPBACK_HOSTS}
            if len(self.headers.get_all("Host", [])) > 1:
                raise RequestError(HTTPStatus.BAD_REQUEST, "more than one Host header")
            host = (self.headers.get("Host") or "").strip().lower()
            if host not in allowed:
                raise RequestError(HTTPStatus.FORBIDDEN, f"Host {host!r} is not this loopback server (expected 127.0.0.1:{port} or localhost:{port})")
            origin = self.headers.get("Origin")
            if origin is not None and origin.strip().lower() not in {f"http://{a}" for a in allowed}:
                raise RequestError(HTTPStatus.FORBIDDEN, f"requests from origin {origin!r} are refused")

        def _answer(self, handle) -> None:
            """Every failure becomes a JSON answer: 4xx for the request's fault, 5xx for ours."""
            try:
                self._check_origin()
                handle()
            except RequestError as error:
                self._json(error.status, {"error": str(error)})
                self.close_connection = True
            except (ValueError, UnicodeDecodeError) as error:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "out of GPU memory: try a shorter text"})
            except (OSError, TimeoutError):
                self.close_connection = True  # the client went away or stalled: nobody to answer
            except Exception as error:  # noqa: BLE001 - a server thread must answer, not drop the connection
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(error).__name__}"})

        def _get(self) -> None:
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            if path in ("/", "/index.html"):
                return self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
            for prefix, root in (("/assets/", ASSETS), ("/browser/", browser_dir)):
                if path.startswith(prefix):
                    file = (root / path[len(prefix):]).resolve()
                    if file.is_file() and file.is_relative_to(root.resolve()):
                        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                        return self._send(HTTPStatus.OK, file.read_bytes(), kind)
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}"})

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding"):
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
            text = self.headers.get("Content-Length")
            if text is None or not text.strip().isdigit():  # isdigit: no sign, no spaces inside, no '1e3'
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, f"Content-Length must be a non-negative integer, got {text!r}")
            length = int(text)
            if length > MAX_BODY_BYTES:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body may have at most {MAX_BODY_BYTES} bytes")
            body = self.rfile.read(length)
            if len(body) < length:
                raise RequestError(HTTPStatus.BAD_REQUEST, "the body ended before Content-Length bytes")
            return body

        def _post(self) -> None:
            if self.path != "/api/activations":
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}")
            # JSON only: a cross-site form or no-cors fetch cannot send it without a CORS preflight.
            if (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
                raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the body must be sent as application/json")
            body = self._read_body()
            if _json_depth_exceeds(body, MAX_JSON_DEPTH):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
            try:
                request = json.loads(body.decode("utf-8") or "{}", parse_constant=_refuse_constant)
            except RecursionError:
                raise RequestError(HTTPStatus.BAD_REQUEST, "the JSON body nests too deeply") from None
            if not isinstance(request, dict):
                raise ValueError("the request body must be a JSON object")
            self._json(HTTPStatus.OK, scope.activations(request.get("text"), request.get("unit")))

        def do_GET(self):  # noqa: N802 - the base class's name
            self._answer(self._get)

        def do_POST(self):  # noqa: N802
            self._answer(self._post)

    return Handler


def _refuse_constant(name: str):
    raise ValueError(f"the JSON body holds {name}, which JSON does not allow")


class BoundedThreadingHTTPServer(ThreadingHTTPServer):
    """At most MAX_CONCURRENT_REQUESTS threads: one more connection is answered 503 and closed."""

    daemon_threads = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT_REQUESTS)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 31\r\nConnection: close\r\n\r\n{\"error\": \"too many requests\"}\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(scope: Neuroscope, results: Layout, port: int = 8765) -> ThreadingHTTPServer:
    """Bind 127.0.0.1:port (0: any free port) for the loaded neuroscope; call serve_forever() to run."""
    try:
        return BoundedThreadingHTTPServer(("127.0.0.1", port), make_handler(scope, results.browser_dir))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise OSError(error.errno, f"port {port} on 127.0.0.1 is in use: pick another with --port (0: any free port)") from None
        raise
