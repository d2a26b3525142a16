"""Subprocesses that cannot outlive their test: each runs in its own process group, killed whole."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any


def run_to_end(cmd: list[str], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`, but on a timeout the
    whole process group dies, not only `cmd`, and subprocess.TimeoutExpired is raised with its output.

    subprocess.run kills the command alone: torchrun's workers (one hung in gloo's teardown, say)
    would go on running, holding the suite's pipes, long after the test failed.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr) from None
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill whatever is left of the process group `proc` leads (started with start_new_session=True)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
