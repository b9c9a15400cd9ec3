"""Activation I/O (issue 20), side by side in one run on this machine.

    python benchmarks/bench_io.py [--stores results/activations/train_000.zarr ...] [--threads 2]
                                  [--batch 4096] [--tokens 400000] [--repeats 5]

1. Codecs: every candidate Blosc setting re-encodes the same chunks of the stores (as stored: float16,
   mantissa already rounded), one thread each: bytes as % of raw float32, encode and decode MB/s of
   float16 data (medians of --repeats). The default is the one that keeps the writer and the loader
   fastest within the byte budget (<= 41 % of float32); zstd-3 is the choice for users short of disk.
2. Decode roofline: single-thread Blosc decode MB/s (per CPU-second) of the stores' own chunk files,
   in memory; next to it the crc32c that format-2 stores add to every chunk (MB/s of float16 rows
   it covers, per CPU-second) and the Blosc decode plus that crc32c.
3. Loader: ActivationLoader.batches() tokens/s and MB/s with --threads decoding threads, warm page
   cache and cold (evicted from the page cache), float32 batches and store-dtype batches, on
   format-2 copies of the stores (stores without checksums are copied with the same Blosc frames,
   each followed by its crc32c, as the writer now writes them); target: MB/s >= 0.6 x roofline x
   threads. Also MB per CPU-second of the process against the decode's: the efficiency that does
   not depend on how much of the shared machine the run got. Before them, the ceiling: single-thread
   CPU ms per chunk of the steps no loader can skip (read, crc32c, decode into rotating buffers, one
   copy of each row into its batch, the float32 conversion) and the best ratio they leave.
4. Writer alone (no forward pass): float32 rows cast to float16 by torch, rounded, checked,
   encoded, checksummed and written by ActivationStoreWriter with 1 worker; MB/s of float16 per
   CPU-second (process time; median of --repeats after one warm-up store) and bytes; target >= 500
   MB/s per core at <= 41 % of float32 bytes.
Without --stores it writes a synthetic float16 store (GELU of Gaussians, d 512) to a temporary directory.
Every section prints the load average it ran at (the development machine is shared).
The harvest overhead (store on top of the bare forward pass) is benchmarks/bench_pipeline.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import numpy as np
import torch
import zarr

from monoscope.loader import ActivationLoader
from monoscope.store import ActivationStoreWriter, ChunkFiles, CodecSpec, all_finite, chunk_tokens_for, open_activations, write_activation_store

CANDIDATES = [
    CodecSpec("zstd", 3, "bitshuffle", 8),
    CodecSpec("zstd", 1, "bitshuffle", 8),
    CodecSpec("lz4", 5, "bitshuffle", 8),
    CodecSpec("lz4", 1, "bitshuffle", 8),
    CodecSpec("lz4", 5, "shuffle", 8),
    CodecSpec("blosclz", 5, "bitshuffle", 8),
]


def synthetic_store(work: Path, n_tokens: int = 65_536 * 4, d: int = 512) -> Path:
    rng = np.random.default_rng(0)
    acts = torch.nn.functional.gelu(torch.from_numpy(rng.normal(size=(n_tokens, d)).astype(np.float32) * 1.5 - 0.5))
    path = work / "synthetic.zarr"
    write_activation_store(path, acts.numpy(), np.zeros((n_tokens // 128, 128), np.int32), {"model_id": "synthetic"},
                           chunk_tokens=chunk_tokens_for(d, "float16", 128, 4), codec=CodecSpec(keep_mantissa_bits=8))  # fmt: skip
    return path


def one_thread(fn):
    """Run fn on a worker thread: numcodecs' Blosc then uses one thread, as the writer's and loader's workers do."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def median_seconds(fn, repeats: int) -> float:
    """Median CPU seconds of fn on one thread (CPU time, not wall: the machine is shared and noisy)."""

    def timed() -> float:
        start = time.thread_time()
        fn()
        return time.thread_time() - start

    return statistics.median(one_thread(timed) for _ in range(repeats))


def load() -> str:
    return "load average " + " ".join(open("/proc/loadavg").read().split()[:3])


def chunk_files(path: Path) -> list[Path]:
    return sorted(f for f in (path / "acts" / "c").rglob("*") if f.is_file())


def codecs_table(chunks: list[np.ndarray], repeats: int) -> None:
    from numcodecs import blosc

    megabytes = sum(c.nbytes for c in chunks) / 1e6
    print(f"[codec] {len(chunks)} chunks, {megabytes:.0f} MB of float16, 1 thread, median of {repeats}; {load()}")
    print(f"[codec] {'codec':28}{'% of fp32':>10}{'encode MB/s':>13}{'decode MB/s':>13}")
    for codec in CANDIDATES:
        encoded = one_thread(lambda: [codec.encode(c) for c in chunks])
        out = np.empty_like(chunks[0])
        encode_s = median_seconds(lambda: [codec.encode(c) for c in chunks], repeats)
        decode_s = median_seconds(lambda: [blosc.decompress(e, out) for e in encoded], repeats)
        percent = 100 * sum(map(len, encoded)) / (2 * sum(c.nbytes for c in chunks))
        name = f"{codec.cname}-{codec.clevel} {codec.shuffle}"
        print(f"[codec] {name:28}{percent:10.1f}{megabytes / encode_s:13.0f}{megabytes / decode_s:13.0f}")


def decode_roofline(paths: list[Path], repeats: int, max_files: int = 48) -> float:
    """Single-thread MB/s (of float16 rows per CPU-second) of decompressing the stores' own chunk
    files, already in memory: the strict roofline (reading them from the page cache costs more)."""
    from numcodecs import blosc

    files = [f for p in paths for f in chunk_files(p)][:max_files]
    encoded = [f.read_bytes() for f in files]
    store = open_activations(paths[0])
    out = np.empty((store.chunk_tokens, store.d), store.acts.dtype)
    seconds = median_seconds(lambda: [blosc.decompress(e, out) for e in encoded], repeats)
    return len(files) * out.nbytes / 1e6 / seconds


def crc_rate(paths: list[Path], repeats: int, max_files: int = 48) -> float:
    """Single-thread MB/s (of the float16 rows they hold, per CPU-second) of crc32c over the chunk files."""
    encoded = [f.read_bytes() for p in paths for f in chunk_files(p)][:max_files]
    store = open_activations(paths[0])
    seconds = median_seconds(lambda: [crc32c.crc32c(e) for e in encoded], repeats)
    return len(encoded) * store.chunk_tokens * store.d * store.acts.dtype.itemsize / 1e6 / seconds


def checksummed_copy(path: Path, dest: Path) -> Path:
    """A format-2 copy of a store: each chunk file is the same Blosc frame followed by its crc32c,
    the array's codecs end in crc32c, and the attrs list the chunks holding NaN/inf."""
    shutil.copytree(path, dest)
    store = open_activations(dest)
    if store.checksummed:
        return dest
    files = ChunkFiles.of(store)
    out = np.empty((store.chunk_tokens, store.d), store.acts.dtype)
    nonfinite = []
    for index in range(-(-store.n_tokens // store.chunk_tokens)):
        files.decode(index, out)
        if not all_finite(out):
            nonfinite.append(index)
        file = files.path(index)
        frame = file.read_bytes()
        file.write_bytes(frame + crc32c.crc32c(frame).to_bytes(4, "little"))
    meta = json.loads((dest / "acts" / "zarr.json").read_text())
    meta["codecs"].append({"name": "crc32c"})
    (dest / "acts" / "zarr.json").write_text(json.dumps(meta))
    zarr.open_group(dest, mode="r+").attrs.update({"format_version": 2, "nonfinite_chunks": nonfinite})
    assert open_activations(dest).checksummed
    return dest


def parallel_decode_rate(paths: list[Path], threads: int, max_files: int = 48) -> float:
    """Wall MB/s of `threads` threads decompressing the in-memory chunk files at once: what the cores
    really give together on this machine, next to the single-thread rate times the cores."""
    from numcodecs import blosc

    encoded = [f.read_bytes() for p in paths for f in chunk_files(p)][:max_files]
    store = open_activations(paths[0])
    outs = [np.empty((store.chunk_tokens, store.d), store.acts.dtype) for _ in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        list(pool.map(lambda i: [blosc.decompress(e, outs[i]) for e in encoded[i::threads]], range(threads)))
        seconds = time.perf_counter() - start
    return len(encoded) * outs[0].nbytes / 1e6 / seconds


def loader_ceiling(paths: list[Path], repeats: int, max_files: int = 48) -> dict[str, float]:
    """Single-thread CPU ms per chunk of what every chunk a loader serves must go through, whatever the
    loader: read from the page cache, crc32c (format 2), Blosc decode into buffers that rotate as the
    loader's pool does (not one cache-hot buffer), one contiguous copy of the decoded rows (the least
    any shuffle costs: each row must move once into its batch) and the float16 -> float32 conversion."""
    from numcodecs import blosc

    files = [f for p in paths for f in chunk_files(p)][:max_files]
    store = open_activations(paths[0])
    rows, trailer = (store.chunk_tokens, store.d), 4 if store.checksummed else 0
    encoded = [f.read_bytes() for f in files]
    frames = [e[: len(e) - trailer] for e in encoded]
    slots = np.empty((16, *rows), store.acts.dtype)
    batch16, batch32 = torch.empty(rows, dtype=torch.float16), torch.empty(rows)
    buffer = bytearray(max(map(len, encoded)) + 1)

    def read() -> None:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.preadv(fd, [buffer], 0)
            os.close(fd)

    for i, frame in enumerate(frames):
        blosc.decompress(frame, slots[i % 16])
    decoded = torch.from_numpy(slots)
    steps = {
        "read": read,
        "crc32c": lambda: [crc32c.crc32c(e) for e in frames],
        "decode": lambda: [blosc.decompress(e, slots[i % 16]) for i, e in enumerate(frames)],
        "copy": lambda: [batch16.copy_(decoded[i % 16]) for i in range(len(files))],
        "to float32": lambda: [batch32.copy_(decoded[i % 16]) for i in range(len(files))],
    }
    return {name: 1e3 * median_seconds(step, repeats) / len(files) for name, step in steps.items()}


def evict_from_page_cache(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def loader_rate(paths: list[Path], batch: int, tokens: int, threads: int, dtype) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU-second of the process) in steady state: timed after the
    start-up, where every stream reads its first block and prefetches the next before batch 0."""
    buffer_tokens = 262_144
    loader = ActivationLoader(paths, batch_size=batch, buffer_tokens=buffer_tokens, streams=8, threads=threads, dtype=dtype)
    batches = loader.batches()
    for _ in range(2 * buffer_tokens // batch):
        next(batches)
    n = max(1, tokens // batch)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(batches)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    batches.close()
    return n * batch / wall, n * batch / cpu


def writer_rate(rows32: torch.Tensor, codec: CodecSpec, work: Path, context: int, repeats: int) -> tuple[float, float, float]:
    """(MB/s of float16 per CPU-second, wall MB/s, % of float32 bytes) for ActivationStoreWriter with
    1 worker: medians of `repeats` stores, after one untimed store (the allocator's first large
    buffers fault in their pages once per process, not once per store)."""
    d = rows32.shape[1]
    tokens = np.zeros((len(rows32) // context, context), np.int32)
    step = 8192  # a harvest batch: 64 sequences of 128
    per_cpu, per_wall = [], []
    for i in range(repeats + 1):
        path = work / f"writer-{codec.cname}-{i}.zarr"
        cpu, wall = time.process_time(), time.perf_counter()
        with ActivationStoreWriter(path, tokens, d, "float16", chunk_tokens_for(d, "float16", context, 4), {}, codec, workers=1) as writer:
            for start in range(0, len(rows32), step):
                writer.append(rows32[start : start + step].to(torch.float16).numpy(), consume=True)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        stored = sum(f.stat().st_size for f in chunk_files(path))
        shutil.rmtree(path)
        if i:
            per_cpu.append(rows32.numel() * 2 / 1e6 / cpu)
            per_wall.append(rows32.numel() * 2 / 1e6 / wall)
    return statistics.median(per_cpu), statistics.median(per_wall), 100 * stored / (rows32.numel() * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", type=Path, nargs="*", help="activation stores; default: a synthetic one")
    parser.add_argument("--threads", type=int, default=2, help="the loader's decoding threads (cores it uses)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=524_288,
                        help="tokens drawn per loader measurement, after the start-up: a multiple of the loader's "
                             "262,144-token buffer, so the blocks decoded while timing match the blocks consumed")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codec-chunks", type=int, default=32, help="chunks re-encoded per codec (and written by the writer)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the writer's cast counts as one core's work

    with tempfile.TemporaryDirectory(prefix="bench_io_") as tmp:
        work = Path(tmp)
        paths = args.stores or [synthetic_store(work)]
        stores = [open_activations(p) for p in paths]
        first = stores[0]
        bytes_per_token = first.d * first.acts.dtype.itemsize
        print(f"[stores] {len(paths)} stores, {sum(s.n_tokens for s in stores):,} tokens x {first.d} {first.acts.dtype}, "
              f"chunks of {first.chunk_tokens} tokens ({first.chunk_tokens * bytes_per_token / 2**20:.0f} MiB), codec {first.attrs.get('codec')}")  # fmt: skip

        n_chunks = min(args.codec_chunks, first.n_tokens // first.chunk_tokens)
        chunks = [np.ascontiguousarray(first.acts[i * first.chunk_tokens : (i + 1) * first.chunk_tokens]) for i in range(n_chunks)]
        codecs_table(chunks, args.repeats)

        copies = work / "format2"
        copies.mkdir()
        loaded = [checksummed_copy(p, copies / p.name) for p in paths]  # what the loader reads: format 2
        for p in [*paths, *loaded]:  # warm the page cache
            for f in chunk_files(p):
                f.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # format-1 stores, if the loader is pointed at them
            # Rounds interleave the roofline with the loader, so the shared machine's load hits both alike.
            rounds = {label: [] for label in ("float32 batches", "float16 batches")}
            rooflines, crcs, together = [], [], []
            for _ in range(args.repeats):
                rooflines.append(decode_roofline(paths, 1))
                crcs.append(crc_rate(paths, 1))
                together.append(parallel_decode_rate(paths, args.threads))
                for label, dtype in (("float32 batches", torch.float32), ("float16 batches", None)):
                    rounds[label].append(loader_rate(loaded, args.batch, args.tokens, args.threads, dtype))
            roofline, crc = statistics.median(rooflines), statistics.median(crcs)
            print(f"[decode] the stores' own chunk files, in memory, 1 thread: {roofline:.0f} MB/s per CPU-second (median of "
                  f"{args.repeats}; all {', '.join(f'{r:.0f}' for r in rooflines)}); loader target 0.6 x {args.threads} threads = "
                  f"{0.6 * roofline * args.threads:.0f} MB/s; {args.threads} threads decoding at once: {statistics.median(together):.0f} MB/s wall; {load()}")  # fmt: skip
            print(f"[decode] crc32c of the same files: {crc:.0f} MB/s of rows per CPU-second; decode + crc32c "
                  f"{1 / (1 / roofline + 1 / crc):.0f} MB/s: the checksum costs {100 * roofline / crc:.0f} % of a decode")  # fmt: skip
            ceiling = loader_ceiling(loaded, args.repeats)
            chunk_mb = first.chunk_tokens * bytes_per_token / 1e6
            floor16 = sum(ms for name, ms in ceiling.items() if name != "to float32")
            print(f"[ceiling] per {chunk_mb:.1f} MB chunk, 1 thread, CPU ms: " + ", ".join(f"{name} {ms:.2f}" for name, ms in ceiling.items())
                  + f"; the roofline's decode is {chunk_mb / roofline * 1e3:.2f}. A loader that reads, checks, decodes and moves each row once "
                  f"reaches at most {chunk_mb / roofline * 1e3 / floor16:.2f} of roofline x cores with float16 batches, "
                  f"{chunk_mb / roofline * 1e3 / (floor16 + ceiling['to float32']):.2f} with float32 ones; {load()}")  # fmt: skip
            for label, dtype in (("float32 batches", torch.float32), ("float16 batches", None)):
                for p in loaded:
                    evict_from_page_cache(p)
                cold = loader_rate(loaded, args.batch, args.tokens, args.threads, dtype)
                warm_rates = [r[0] for r in rounds[label]]
                warm = (statistics.median(warm_rates), statistics.median(r[1] for r in rounds[label]))
                for name, (rate, per_cpu) in (("warm", warm), ("cold", cold)):
                    megabytes, cpu_megabytes = rate * bytes_per_token / 1e6, per_cpu * bytes_per_token / 1e6
                    spread = f" (medians of {args.repeats}; wall {min(warm_rates) * bytes_per_token / 1e6:.0f}-{max(warm_rates) * bytes_per_token / 1e6:.0f} MB/s)" if name == "warm" else " (one run)"
                    print(f"[loader] {label}, {name} cache, {args.threads} threads: {rate:10,.0f} tokens/s = {megabytes:5.0f} MB/s "
                          f"= {megabytes / (roofline * args.threads):.2f} of roofline x threads (target >= 0.6); "
                          f"{cpu_megabytes:.0f} MB per CPU-second = {cpu_megabytes / roofline:.2f} of the decode's{spread}; {load()}")  # fmt: skip

        rows32 = torch.from_numpy(np.concatenate(chunks).astype(np.float32))
        for codec in (CodecSpec("lz4", 5, "bitshuffle", 8), CodecSpec("zstd", 3, "bitshuffle", 8)):
            per_core, wall, percent = writer_rate(rows32, codec, work, first.context, args.repeats)
            print(f"[writer] {codec.cname}-{codec.clevel} {codec.shuffle}, 1 worker: {per_core:.0f} MB/s of float16 per core "
                  f"(wall {wall:.0f} MB/s; medians of {args.repeats}) at {percent:.1f} % of float32 bytes (target >= 500 MB/s per core at <= 41 %); {load()}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
