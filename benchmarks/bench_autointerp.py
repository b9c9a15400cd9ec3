"""Autointerp client benchmark against the real local server behind the fault proxy.

Prints (1) throughput versus concurrency C with a fixed artificial latency per request added by the
proxy, as a ratio to C times the sequential rate (target >= 0.8 for C <= 16), and (2) the number of
requests a rerun of the same work sends (target 0).

    .venv/bin/python benchmarks/bench_autointerp.py [--latency 1.0] [--requests-per-slot 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from llm_server import llama_server  # noqa: E402

from monoscope.autointerp.client import ClientConfig, LLMClient  # noqa: E402
from monoscope.config import default_settings  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402


async def batch(base_url: str, cache: Path, concurrency: int, n: int, tag: str) -> tuple[float, dict]:
    config = default_settings(ClientConfig, base_url=base_url, model="smollm2-135m", api_key_env="", concurrency=concurrency)
    async with LLMClient(config, cache) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client.chat([{"role": "user", "content": f"{tag} item {i}: say ok"}], max_tokens=1,
                                           temperature=0) for i in range(n)))
        return time.perf_counter() - started, client.usage_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds the proxy adds to every request")
    parser.add_argument("--requests-per-slot", type=int, default=2, help="requests per unit of concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--upstream", choices=["llama", "stub"], default="llama",
                        help="llama: the real server (one process, requests queue for its compute); "
                             "stub: the proxy answers itself, so only the client and the latency are measured")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, llama_server(Path(tmp) / "server.log") as url:
        root = url.removesuffix("/v1")
        with FaultProxy(root) as direct:
            seconds, _ = asyncio.run(batch(direct.url + "/v1", Path(tmp) / "warm.sqlite", 1, 8, "warm"))
            print(f"llama.cpp server time per request without added latency: {seconds / 8 * 1000:.0f} ms")
        upstream = root if args.upstream == "llama" else None
        with FaultProxy(upstream, latency_s=args.latency) as proxy:
            print(f"upstream: {args.upstream}")
            sequential = None
            print(f"latency {args.latency:.2f} s per request")
            print(f"{'C':>3} {'requests':>8} {'seconds':>8} {'req/s':>7} {'ratio to C x sequential':>24}")
            for c in args.concurrency:
                n = max(8, args.requests_per_slot * c)
                seconds, usage = asyncio.run(batch(proxy.url + "/v1", Path(tmp) / f"c{c}.sqlite", c, n, f"c{c}"))
                rate = n / seconds
                sequential = sequential or (rate if c == 1 else None)
                ratio = f"{rate / (c * sequential):.2f}" if sequential else "-"
                print(f"{c:>3} {usage['requests']:>8} {seconds:>8.2f} {rate:>7.2f} {ratio:>24}")
            last = args.concurrency[-1]
            before = proxy.counts.received
            _, usage = asyncio.run(batch(proxy.url + "/v1", Path(tmp) / f"c{last}.sqlite", last,
                                         max(8, args.requests_per_slot * last), f"c{last}"))
            print(f"rerun of the C={last} batch: {usage['requests']} requests sent, {usage['cache_hits']} cache hits, "
                  f"{proxy.counts.received - before} reached the proxy")


if __name__ == "__main__":
    main()
