"""monoscope.atomic, the one way outputs are written: whole or absent, old output kept until the new
one is whole, temporaries of killed attempts removed, fsync before the rename."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from monoscope import atomic

ROOT = Path(__file__).resolve().parents[1]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_failed_write_keeps_the_old_output_and_leaves_nothing(tmp_path, kind):
    final = tmp_path / "out"
    atomic.write_text(final, "old") if kind == "file" else (final.mkdir(), (final / "a").write_text("old"))
    with pytest.raises(RuntimeError), atomic.atomic_path(final) as tmp:
        if kind == "file":
            tmp.write_text("half")
        else:
            tmp.mkdir()
            (tmp / "a").write_text("half")
        raise RuntimeError("killed halfway")
    assert (final if kind == "file" else final / "a").read_text() == "old"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("old, new", [("file", "file"), ("dir", "dir"), ("file", "dir"), ("dir", "file"), (None, "dir")])
def test_replacing_any_output_with_any_other(tmp_path, old, new):
    final = tmp_path / "out"
    if old == "file":
        final.write_text("old")
    elif old == "dir":
        final.mkdir()
        (final / "stale_member").write_text("old")
    with atomic.atomic_path(final) as tmp:
        if new == "file":
            tmp.write_text("new")
        else:
            tmp.mkdir()
            (tmp / "member").write_text("new")
    assert (final.read_text() if new == "file" else sorted(os.listdir(final))) == ("new" if new == "file" else ["member"])
    assert leftovers(tmp_path) == []


def test_writing_nothing_is_an_error_not_an_empty_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic.atomic_path(tmp_path / "out"):
        pass
    assert not (tmp_path / "out").exists()


def test_the_new_bytes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    with atomic.atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
        for name in "abc":
            (tmp / name).write_text(name)
    assert order.index("replace") >= 4 and order[:4] == ["fsync"] * 4  # three files and their directory first
    assert order[-1] == "fsync"  # then the parent, so the rename itself is durable


KILLED_WRITER = """
import sys, time
from monoscope import atomic
with atomic.atomic_path(sys.argv[1]) as tmp:
    tmp.mkdir()
    (tmp / "big").write_bytes(b"x" * 1_000_000)
    print("writing", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("names", [["store.zarr"], ["metrics.json", "a[1]*.txt"]])
def test_temporaries_of_a_killed_writer_go_on_the_next_write(tmp_path, names):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for name in names:
        job = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path / name)], env=env, stdout=subprocess.PIPE, text=True)
        assert job.stdout.readline().strip() == "writing"
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert len(leftovers(tmp_path)) == len(names)  # what kill -9 leaves: GBs, for a store
    (tmp_path / ".unrelated.tmp-1").write_text("another output's, left alone")
    for name in names:
        atomic.write_text(tmp_path / name, "whole")
        assert (tmp_path / name).read_text() == "whole"
    assert leftovers(tmp_path) == [".unrelated.tmp-1"]


def test_atomic_open_refuses_append(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic.atomic_open(tmp_path / "log", "a"):
            pass


WRITE_CALL = re.compile(r"(?<!atomic)\.write_text\(|(?<!atomic)\.write_bytes\(|open\([^)]*['\"]w|\.to_parquet\(|\.to_csv\(|\.savefig\(|"
                        r"\bsave_file\(|torch\.save\(|save_pretrained\(")
# Functions that write into a directory their caller builds under atomic_path (not outputs themselves),
# and files that are not pipeline outputs.
WRITES_INTO_CALLERS_TEMPORARY = {("site.py", "write_dictionary"), ("evaluate.py", "save_codes"),
                                 ("saelens_export.py", "ensure_saelens_env"), ("store.py", "_round_and_store")}


def test_outputs_are_written_only_through_the_atomic_helper():
    """Every write in the package goes to a temporary of atomic_path (its target names `tmp`), or sits
    in a function that writes into its caller's temporary directory."""
    offenders = []
    for path in sorted((ROOT / "src" / "monoscope").rglob("*.py")) + sorted((ROOT / "workflow" / "scripts").glob("*.py")):
        if path.name == "atomic.py":
            continue
        function = None
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if match := re.match(r"\s*(?:async )?def (\w+)", line):
                function = match.group(1)
            if WRITE_CALL.search(line) and "tmp" not in line and (path.name, function) not in WRITES_INTO_CALLERS_TEMPORARY:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "write through monoscope.atomic instead:\n" + "\n".join(offenders)
