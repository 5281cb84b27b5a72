"""Child processes of a launcher (``ssd-service up``, ``worker.pool``): started in a session of their
own, so a terminal's Ctrl-C reaches only the launcher, which then stops them in order; and told
to stop (SIGTERM) if the launcher dies without doing so."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable


def _die_with_parent() -> None:
    """In the child, before exec: a session of its own, and SIGTERM if the launcher dies first (Linux)."""
    os.setsid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, preexec_fn=_die_with_parent)  # preexec_fn is safe: no threads yet


def stop(process: subprocess.Popen, name: str, grace: float, say: Callable[[str], None] = print) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        say(f"{name} did not stop within {grace:.0f}s; killing it")
        process.kill()
        process.wait()
