"""How the API and the workers of one host share its CPU cores (``SSD_API_CPU_CORES``).

PyTorch gives every process as many threads as the host has cores. Two such processes
computing at once (the API detecting while a worker trains) run twice as many threads as
cores, and each parallel region then waits for threads the other process has descheduled:
both slow down far more than by half. So with ``SSD_API_CPU_CORES`` set, the API keeps that
many cores and a worker takes the rest; unset, each process has all of them.
"""

from __future__ import annotations

import os

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


def worker_threads(settings: Settings) -> int:
    """A worker's PyTorch threads: the cores the API does not keep, at least one."""
    cores = host_cores()
    return max(1, cores - settings.api_cpu_cores) if settings.api_cpu_cores else cores


def shared_host_api_cores() -> int:
    """``SSD_API_CPU_CORES`` for a host that runs the API and a worker (``ssd-service up``): half the cores."""
    return max(1, host_cores() // 2)


def use_threads(count: int) -> None:
    import torch  # here: the launcher reads the split without loading torch

    torch.set_num_threads(count)


def threads_line() -> str:
    """This process's thread count, for its log."""
    import torch

    api = os.environ.get("SSD_API_CPU_CORES") or "unset"
    return f"PyTorch CPU threads: {torch.get_num_threads()} of {host_cores()} cores (SSD_API_CPU_CORES: {api})"
