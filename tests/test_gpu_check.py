"""benchmarks/gpu_check.py keeps working: it runs here on the CPU with a tiny budget (a GPU runs it at full size)."""

import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_prints_every_rate(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    gpu_check.main(["--seqs", "24", "--batch", "256", "--expansion", "2", "--steps", "1", "--loader-batches", "2"])
    out = capsys.readouterr().out
    assert re.search(r"\[harvest\] 3,072 tokens: bare forward [\d,]+ tokens/s, harvest_shard [\d,]+ tokens/s", out)
    for label in ("float32 dense", "float32 sparse", "bfloat16 dense"):  # bf16 CSR may be missing on a CPU
        assert re.search(rf"\[sae\] {label} +512 x 1024, batch 256: +[\d,]+ tokens/s \(L0 \d+\)", out), label
    sparse_l0 = int(re.search(r"float32 sparse .*\(L0 (\d+)\)", out).group(1))
    assert sparse_l0 < 0.05 * 1024, "the sparse regime should fire about 1 % of the features"
    for label in ("float32 batches", "float16 batches"):
        assert re.search(rf"\[loader\] {label}, to \w+: +[\d,]+ tokens/s = [\d.]+ x the fastest trainer step", out), label
