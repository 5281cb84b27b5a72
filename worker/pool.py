"""``python -m worker.pool`` (``ssd-service workers``): a training worker for each GPU of this host.

``SSD_GPUS`` says which: ``all`` (the default) every GPU this process can see (those in
``CUDA_VISIBLE_DEVICES`` if it is set), a list of GPU indices such as ``0,1,3``, or ``none``. A host
where that finds no GPU runs one CPU worker.

Each worker is the Celery worker of ``worker.__main__`` (one task at a time) with
``CUDA_VISIBLE_DEVICES`` set to its one GPU, which it then sees as ``cuda:0``, and ``SSD_WORKER_GPU``
naming that GPU, which the jobs it runs record; its node name says which GPU too
(``ssd-worker-gpu1-<pid>@host``), so /readyz tells the workers apart.

Why not ``celery multi``: it starts detached daemons and leaves them. This pool stays in the
foreground (a container's main process, or a terminal's), starts a worker again when one dies
(after a pause that grows while it keeps dying), and passes SIGTERM or Ctrl-C on to every worker
once: each pauses its job at the next batch, puts it back in the queue, and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from core.processes import spawn, stop
from core.settings import Settings
from worker.__main__ import celery_worker_args

log = logging.getLogger("worker.pool")

STOP_GRACE_SECONDS = 60.0  # a batch and a checkpoint (as Compose's stop_grace_period)
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # seconds before starting a worker that died, by deaths in a row
STEADY_SECONDS = 60.0  # a worker that ran this long before dying starts again at the first delay


def cuda_device_count() -> int:
    """GPUs torch sees (without creating a CUDA context); 0 without torch's CUDA."""
    try:
        import torch

        return torch.cuda.device_count()
    except (ImportError, RuntimeError):
        return 0


def visible_gpus(setting: str, environ: dict[str, str] | None = None, count: Callable[[], int] = cuda_device_count):
    """The GPU indices ``SSD_GPUS`` names on this host, as strings; [] for a CPU worker."""
    environ = dict(os.environ) if environ is None else environ
    if setting == "none":
        return []
    if setting != "all":
        return [gpu.strip() for gpu in setting.split(",")]
    if "CUDA_VISIBLE_DEVICES" in environ:
        named = [gpu.strip() for gpu in environ["CUDA_VISIBLE_DEVICES"].split(",")]
        return [gpu for gpu in named if gpu and not gpu.startswith("-")]  # "-1" or "" hide every GPU
    return [str(index) for index in range(count())]


@dataclass
class Member:
    """One worker of the pool: what it is started with, its process, and how it has been dying."""

    label: str  # "gpu1" or "cpu"
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    deaths_in_a_row: int = 0
    start_after: float = 0.0


def members(settings: Settings, environ: dict[str, str] | None = None, gpus: list[str] | None = None) -> list[Member]:
    """A worker per GPU of ``gpus`` (default: what ``SSD_GPUS`` finds), or one CPU worker."""
    environ = dict(os.environ if environ is None else environ)
    gpus = visible_gpus(settings.gpus, environ) if gpus is None else gpus
    if not gpus:
        return [Member("cpu", celery_worker_args(settings, f"ssd-worker-cpu-{os.getpid()}"), environ)]
    return [
        Member(
            f"gpu{gpu}",
            celery_worker_args(settings, f"ssd-worker-gpu{gpu}-{os.getpid()}"),
            {**environ, "CUDA_VISIBLE_DEVICES": gpu, "SSD_WORKER_GPU": gpu},
        )
        for gpu in gpus
    ]


class Pool:
    """Keeps ``members`` running until ``stopping`` is set, then stops them all (each pauses its job)."""

    def __init__(self, pool: list[Member], stopping: threading.Event, clock: Callable[[], float] = time.monotonic):
        self.pool = pool
        self.stopping = stopping
        self.clock = clock

    def run(self) -> int:
        while not self.stopping.is_set():
            for member in self.pool:
                self._tend(member)
            self.stopping.wait(0.5)
        log.info("stopping %d worker(s): each pauses its job at the next batch", len(self.pool))
        running = [(m, m.process) for m in self.pool if m.process is not None and m.process.poll() is None]
        for _, process in running:  # every worker hears it at once, then each is waited for
            process.send_signal(signal.SIGTERM)
        for member, process in running:
            stop(process, f"worker {member.label}", STOP_GRACE_SECONDS, log.warning)
        return 0

    def _tend(self, member: Member) -> None:
        """Start a member that is not running, once its restart delay has passed."""
        now = self.clock()
        if member.process is not None:
            code = member.process.poll()
            if code is None:
                return
            ran = now - member.started_at
            member.deaths_in_a_row = 1 if ran >= STEADY_SECONDS else member.deaths_in_a_row + 1
            delay = RESTART_DELAYS[min(member.deaths_in_a_row, len(RESTART_DELAYS)) - 1]
            log.warning(
                "worker %s exited with code %s after %.0fs; starting it again in %.0fs", member.label, code, ran, delay
            )
            member.process, member.start_after = None, now + delay
        if now >= member.start_after:
            member.process, member.started_at = spawn(member.args, member.env), now
            log.info("worker %s started (pid %d)", member.label, member.process.pid)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s: %(levelname)s/pool] %(message)s")
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    pool = members(Settings())
    log.info("%d worker(s): %s", len(pool), ", ".join(member.label for member in pool))
    raise SystemExit(Pool(pool, stopping).run())


if __name__ == "__main__":
    main()
