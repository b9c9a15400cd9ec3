"""scripts/slurm/down.sh checks before it acts: a stale pidfile whose PID now names another process
is left alone, and only a state directory that up.sh made (its marker inside) is removed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DOWN = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "down.sh"


def down(state: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DOWN)], env={**os.environ, "MONOSCOPE_SLURM_STATE": str(state)},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("daemon", ["slurmd", "slurmctld", "munged"])
def test_a_stale_pidfile_naming_another_process_kills_nothing(tmp_path, daemon):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / ".monoscope-slurm-state").write_text("marker")
        (state / f"{daemon}.pid").write_text(f"{bystander.pid}\n")
        done = down(state)
        assert done.returncode == 0 and bystander.poll() is None, "down.sh killed a process that is not the daemon"
        assert f"not {daemon}" in done.stderr and not state.exists()
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("content", ["garbage", "-1", "1 2", "$(touch /tmp/x)", ""])
def test_a_pidfile_that_is_not_a_pid_is_ignored(tmp_path, content):
    state = tmp_path / "state"
    state.mkdir()
    (state / ".monoscope-slurm-state").write_text("marker")
    (state / "slurmd.pid").write_text(content)
    assert down(state).returncode == 0 and not state.exists()


def test_a_state_path_up_sh_did_not_make_is_not_removed(tmp_path):
    foreign = tmp_path / "important"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep me")
    done = down(foreign)
    assert done.returncode == 1 and "refusing" in done.stderr and (foreign / "data.txt").exists()
    link = tmp_path / "link"
    link.symlink_to(foreign)
    assert down(link).returncode == 1 and (foreign / "data.txt").exists()
    plain = tmp_path / "file"
    plain.write_text("x")
    assert down(plain).returncode == 1 and plain.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert down(empty).returncode == 0 and not empty.exists()
    assert down(tmp_path / "absent").returncode == 0
