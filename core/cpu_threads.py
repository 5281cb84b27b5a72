"""How the API and the workers of one host share its CPU cores (``SSD_API_CPU_CORES``).

PyTorch gives every process as many threads as the host has cores. Two such processes
computing at once (the API detecting while a worker trains) run twice as many threads as
cores, and each parallel region then waits for threads the other process has descheduled:
both slow down far more than by half. So with ``SSD_API_CPU_CORES`` set, the API detects on
that many cores, and a worker training on the CPU uses every core while the API is idle and
the rest while it detects: the API says so in Redis (``DetectingSignal``), and the worker
changes its thread count between batches (``CoreSharing``). Unset, each process has all of them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from core.settings import Settings


def host_cores() -> int:
    """The cores PyTorch would use in this process (its default thread count: ``OMP_NUM_THREADS`` or the
    cores this process may run on)."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def api_threads(settings: Settings) -> int:
    """The API's PyTorch threads: ``SSD_API_CPU_CORES``, or every core."""
    return settings.api_cpu_cores or host_cores()


def worker_threads_beside_api(settings: Settings) -> int:
    """A worker's PyTorch threads while the API detects: the cores the API does not keep, at least one."""
    cores = host_cores()
    return max(1, cores - settings.api_cpu_cores) if settings.api_cpu_cores else cores


def shared_host_api_cores() -> int:
    """``SSD_API_CPU_CORES`` for a host that runs the API and a worker (``ssd-service up``): half the cores."""
    return max(1, host_cores() // 2)


def use_threads(count: int) -> None:
    import torch  # here: the launcher reads the split without loading torch

    torch.set_num_threads(count)


def threads_line(settings: Settings) -> str:
    """This process's thread count, for its log."""
    import torch

    api = settings.api_cpu_cores or "unset"
    return f"PyTorch CPU threads: {torch.get_num_threads()} of {host_cores()} cores (SSD_API_CPU_CORES: {api})"


log = logging.getLogger(__name__)

# How long the API's "detecting" lasts in Redis after its last forward pass, and how often each
# side looks: a worker gives cores back within about a second of a request, and takes them
# again a few seconds after the last one.
DETECTING_TTL_MS = 3000
POLL_SECONDS = 0.5


class _Ticker:
    """``tick()`` every ``POLL_SECONDS`` on a daemon thread until ``stop()``; errors are logged, never raised."""

    def __init__(self, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.tick()
            except Exception as error:  # Redis away: the next tick tries again
                log.debug("%s: %s", self._thread.name, error)

    def tick(self) -> None:
        raise NotImplementedError


class DetectingSignal(_Ticker):
    """The API's side: ``detected()`` (cheap, from the event loop) after each forward pass; a thread of
    its own then keeps ``mark(ttl_ms)`` (the store's "an API is detecting" key) fresh, so the event
    loop never waits on Redis."""

    def __init__(self, mark: Callable[[int], None]):
        super().__init__("ssd-detecting-signal")
        self._mark = mark
        self._last = -float("inf")

    def detected(self) -> None:
        self._last = time.monotonic()

    def tick(self) -> None:
        if time.monotonic() - self._last < POLL_SECONDS * 2:
            self._mark(DETECTING_TTL_MS)


class CoreSharing(_Ticker):
    """A CPU worker's side: ``apply()`` before each batch sets PyTorch's threads to ``beside_api`` while
    ``api_detecting()`` (read on a thread of its own) says an API of this host detects, else ``alone``."""

    def __init__(self, api_detecting: Callable[[], bool], alone: int, beside_api: int):
        super().__init__("ssd-core-sharing")
        self._api_detecting = api_detecting
        self.alone, self.beside_api = alone, beside_api
        self._busy = False

    def tick(self) -> None:
        self._busy = self._api_detecting()

    def apply(self) -> None:
        import torch

        wanted = self.beside_api if self._busy else self.alone
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
