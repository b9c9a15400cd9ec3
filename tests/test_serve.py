"""`monoscope serve` under hostile requests: a real server process, raw sockets, and each class of attack.

Each test sends several variants of one class (bad unit types, bad lengths, foreign hosts, ...) and
checks for a JSON 4xx/5xx answer, never a dropped connection or a hang.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_HOOK, TINY_MODEL, build_tiny_results

from monoscope import serve
from monoscope.layout import Layout


def start(results: Path, config_path: Path, dictionary: str = "x2", port: int = 0) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "monoscope.cli", "serve", "--results", str(results), "--dictionary", dictionary,
         "--config", str(config_path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if match:
            return process, int(match.group(1))
    raise AssertionError(f"monoscope serve exited with {process.wait()} before serving")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    build_tiny_results(root)
    (root / "report" / "browser").mkdir(parents=True)
    (root / "report" / "browser" / "held_out.html").write_text("held-out text")
    (root / "config.yaml").write_text(yaml.safe_dump({"model": TINY_MODEL}))
    return root


@pytest.fixture(scope="module")
def server(results):
    process, port = start(results, results / "config.yaml")
    yield port
    process.terminate()
    process.wait(timeout=10)


def raw(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict]:
    """Send bytes as they are; return (status, JSON body). A dropped connection or a hang fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before reading everything: its answer is still there
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply, "the server dropped the connection without an answer"
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if status == 200 and b"application/json" not in head:
        return status, {"body": body.decode()}
    return status, json.loads(body)  # every answer of the API and every error is valid JSON


def post(port: int, body: bytes | str, host: str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    body = body.encode() if isinstance(body, str) else body
    fields = {"Host": f"127.0.0.1:{port}" if host is None else host, "Content-Type": "application/json", "Content-Length": str(len(body)),
              **(headers or {})}
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return raw(port, f"POST /api/activations HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode() + body)


def test_a_plain_request_is_answered(server):
    status, answer = post(server, json.dumps({"text": "def f(x):\n    return x\n", "unit": 3}))
    assert status == 200 and len(answer["activations"]) == len(answer["tokens"]) > 0


@pytest.mark.parametrize("unit", [True, False, 1.0, 2.5, "1", "0", [1], {"u": 1}, -1, 96, 10**30])
def test_units_other_than_an_integer_in_range_are_refused(server, unit):
    status, answer = post(server, json.dumps({"text": "x = 1", "unit": unit}))
    assert status == 400 and "'unit'" in answer["error"]


@pytest.mark.parametrize("length", ["-1", "-100000", "abc", "1e3", "+5", "0x10", " ", "99999999999999999999", None])
def test_bad_content_lengths_are_answered_at_once(server, length):
    started = time.monotonic()
    status, answer = post(server, b'{"text": "x"}', headers={"Content-Length": length})
    assert 400 <= status < 500 and answer["error"]
    assert time.monotonic() - started < 4  # not read until the stream ends


@pytest.mark.parametrize("body", ["[" * 100_000, '{"text": ' + "[" * 50_000 + "]" * 50_000 + "}",
                                  '{"unit": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
                                  "\xff\xfe", b"\xff\xfe{", '{"text": "x", "unit": NaN}', '{"text": "x", "unit": Infinity}',
                                  "not json", "[1, 2]", '"text"', "null", '{"text": ' + '"a' * 30_000 + '"}'])
def test_malformed_bodies_get_a_json_4xx(server, body):
    status, answer = post(server, body)
    assert 400 <= status < 500 and answer["error"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", "localhost:1",
                                  "127.0.0.1:{port}@evil.example", "", "0.0.0.0:{port}", "192.168.1.10:{port}"])
def test_foreign_hosts_are_refused_for_the_api_and_the_browser(server, host):
    host = host.format(port=server)
    status, answer = post(server, json.dumps({"text": "x", "unit": 0}), host=host)
    assert status == 403 and "Host" in answer["error"]
    status, answer = raw(server, f"GET /browser/held_out.html HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert status == 403


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1", "https://127.0.0.1:{port}",
                                    "http://localhost:{port}.evil.example"])
def test_foreign_origins_are_refused(server, origin):
    status, answer = post(server, json.dumps({"text": "x", "unit": 0}), headers={"Origin": origin.format(port=server)})
    assert status == 403 and "origin" in answer["error"]


def test_the_servers_own_origin_and_loopback_names_are_accepted(server):
    for host in (f"127.0.0.1:{server}", f"localhost:{server}", f"LOCALHOST:{server}"):
        status, _ = post(server, json.dumps({"text": "x", "unit": 0}), host=host, headers={"Origin": f"http://{host.lower()}"})
        assert status == 200
    status, _ = raw(server, f"GET /browser/held_out.html HTTP/1.1\r\nHost: localhost:{server}\r\nConnection: close\r\n\r\n".encode())
    assert status == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_bodies_a_cross_site_form_could_send_are_refused(server, content_type):
    status, _ = post(server, json.dumps({"text": "x", "unit": 0}), headers={"Content-Type": content_type})
    assert status == 415


def test_stalled_clients_cannot_take_every_thread(server):
    stalled = [socket.create_connection(("127.0.0.1", server), timeout=5) for _ in range(serve.MAX_CONCURRENT_REQUESTS)]
    try:
        for sock in stalled:
            sock.sendall(b"POST /api/activations HTTP/1.1\r\n")  # and then nothing
        time.sleep(0.5)
        status, answer = post(server, json.dumps({"text": "x", "unit": 0}))
        assert status == 503 and answer["error"]
    finally:
        for sock in stalled:
            sock.close()
    deadline = time.monotonic() + 10
    while (status := post(server, json.dumps({"text": "x", "unit": 0}))[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200


class _Broken:
    """A dictionary whose encode returns non-finite values or fails as a GPU or a bad shape would."""

    def __init__(self, real, mode: str):
        self.real, self.mode, self.d_sae = real, mode, real.d_sae

    def encode(self, x):
        if self.mode == "nan":
            f = self.real.encode(x)
            f[..., ::2] = torch.nan
            f[..., 1::4] = torch.inf
            return f
        raise {"oom": torch.cuda.OutOfMemoryError("CUDA out of memory"), "shape": RuntimeError("mat1 and mat2 shapes"),
               "index": IndexError("index 7 is out of bounds"), "recursion": RecursionError("deep")}[self.mode]


@pytest.fixture(scope="module")
def in_process(results):
    """The real Neuroscope in this process, so its dictionary can be swapped for a broken one; a 1 s socket timeout."""
    scope = serve.Neuroscope(TINY_MODEL, TINY_HOOK, Layout(results), "x2")
    original = serve.SOCKET_TIMEOUT_S
    serve.SOCKET_TIMEOUT_S = 1
    try:
        httpd = serve.BoundedThreadingHTTPServer(("127.0.0.1", 0), serve.make_handler(scope, results / "report" / "browser"))
    finally:
        serve.SOCKET_TIMEOUT_S = original
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield scope, httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("mode, status", [("nan", 200), ("oom", 503), ("shape", 500), ("index", 500), ("recursion", 500)])
def test_failures_inside_the_computation_get_a_valid_json_answer(in_process, mode, status):
    scope, port = in_process
    real = scope.dictionary
    scope.dictionary = _Broken(real, mode)
    try:
        got, answer = post(port, json.dumps({"text": "def f(x):\n    return x\n", "unit": 0}))
        assert got == status
        if mode == "nan":
            assert answer["activations"][0] is None and all(v is None or v == v for v in answer["activations"])
            assert all(v is None or isinstance(v, float) for _, v in answer["top_units"])
        else:
            assert answer["error"]
    finally:
        scope.dictionary = real


def test_a_client_that_stalls_mid_body_is_dropped_after_the_socket_timeout(in_process):
    _, port = in_process
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /api/activations HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{".encode())
        started = time.monotonic()
        sock.recv(65536)  # returns when the server gives up on the rest of the body and closes
        assert time.monotonic() - started < 5


def test_an_sae_from_another_hook_of_the_same_width_is_refused(results, tmp_path):
    other = tmp_path / "results"
    shutil.copytree(results, other)
    cfg_path = other / "sae" / "x2" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["source_attrs"] = {"hook": "blocks.0.mlp.hook_pre"}  # 48 wide, like hook_post
    cfg_path.write_text(json.dumps(cfg))
    done = subprocess.run([sys.executable, "-m", "monoscope.cli", "serve", "--results", str(other), "--dictionary", "x2",
                           "--config", str(other / "config.yaml"), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "blocks.0.mlp.hook_pre" in done.stderr and "blocks.0.mlp.hook_post" in done.stderr


def test_an_sae_from_another_model_is_refused():
    serve.check_provenance({"hook": "blocks.0.mlp.hook_post", "model_id": "native:aa"}, "blocks.0.mlp.hook_post", "native:aa", "x2")
    serve.check_provenance({}, "blocks.0.mlp.hook_post", "native:aa", "x2")  # recorded before provenance existed
    with pytest.raises(ValueError, match="native:bb.*native:aa"):
        serve.check_provenance({"hook": "blocks.0.mlp.hook_post", "model_id": "native:bb"}, "blocks.0.mlp.hook_post", "native:aa", "x2")


def test_a_busy_port_is_one_line_not_a_traceback(results, server):
    done = subprocess.run([sys.executable, "-m", "monoscope.cli", "serve", "--results", str(results), "--dictionary", "x2",
                           "--config", str(results / "config.yaml"), "--port", str(server)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and f"port {server}" in done.stderr and "in use" in done.stderr
