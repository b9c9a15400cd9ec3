"""Interactive neuroscope: a local web app that shows a unit's activation on every token of typed text.

The model, tokenizer and dictionary load once at start; each request tokenizes the text, runs the model
to the hook and encodes with the dictionary. Listens on 127.0.0.1 only. Endpoints:
    GET  /                      the page (type text, pick a unit)
    POST /api/activations       {"text": str, "unit": int | null} -> tokens, the unit's activations, top units
    GET  /assets/..., /browser/...  the browser's assets, and the static browser when it has been built
"""

from __future__ import annotations

import html
import json
import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from monoscope.config import NEURONS, hook_name

ASSETS = Path(__file__).parent / "site_assets"
MAX_TEXT_CHARS = 20_000


class Neuroscope:
    """The loaded model, tokenizer and dictionary; `activations` is the whole computation."""

    def __init__(self, config: dict[str, Any], results_dir: str | Path, name: str):
        from monoscope import evaluate, models, pretrained, tokenize

        results = Path(results_dir)
        self.name, self.hook = name, hook_name(config)
        self.tokenizer = tokenize.load_tokenizer(results / "tokenizer")
        self.strings = tokenize.token_strings(results / "tokenizer")
        self.bridge = models.load_model(config, results / "model")
        self.context = self.bridge.cfg.n_ctx
        self.device = next(self.bridge.parameters()).device
        probe = pretrained.run_to_hook(self.bridge, torch.zeros(1, 1, dtype=torch.long), self.hook)
        sae_dir = None if name == NEURONS else results / "sae" / name
        if sae_dir is not None and not (sae_dir / "cfg.json").exists():
            raise FileNotFoundError(f"no SAE '{name}' in {results / 'sae'} (expected {sae_dir / 'cfg.json'})")
        self.dictionary = evaluate.load_dictionary(name, sae_dir, probe.shape[-1]).to(self.device)
        self.d_sae = self.dictionary.d_sae
        self.lock = threading.Lock()  # one forward pass at a time: the model is shared

    @torch.no_grad()
    def activations(self, text: str, unit: int | None, n_top: int = 10) -> dict[str, Any]:
        from monoscope import pretrained

        if not isinstance(text, str) or not text:
            raise ValueError("'text' must be a non-empty string")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"'text' is longer than {MAX_TEXT_CHARS} characters")
        if unit is not None and not (isinstance(unit, int) and 0 <= unit < self.d_sae):
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
            "activations": f[:, unit].tolist() if unit is not None else None,
            "top_units": [[int(u), float(v)] for u, v in zip(top.indices, top.values)],
            "truncated_to": self.context if truncated else None,
        }


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
        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, value: Any) -> None:
            self._send(status, json.dumps(value).encode(), "application/json")

        def do_GET(self):  # noqa: N802 - the base class's name
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

        def do_POST(self):  # noqa: N802
            if self.path != "/api/activations":
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path}"})
            try:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(min(length, 4 * MAX_TEXT_CHARS + 1000)) or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("the request body must be a JSON object")
                return self._json(HTTPStatus.OK, scope.activations(request.get("text"), request.get("unit")))
            except (ValueError, json.JSONDecodeError) as error:
                return self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})

    return Handler


def make_server(config: dict[str, Any], results_dir: str | Path, name: str, port: int = 8765) -> ThreadingHTTPServer:
    """Load everything once and bind 127.0.0.1:port (0: any free port); call serve_forever() to run."""
    scope = Neuroscope(config, results_dir, name)
    return ThreadingHTTPServer(("127.0.0.1", port), make_handler(scope, Path(results_dir) / "report" / "browser"))
