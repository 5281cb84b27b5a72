"""The ``Server-Timing`` response header: how long a request's phases took inside the server.

Browsers' developer tools and load generators read it (``bench/detect_load.py``), so the time a
request spends in the server can be told from the time it spends on the network.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class ServerTiming:
    """Phases timed from the moment the handler started, in the order they ran."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._phases: list[tuple[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as ``name`` (a token: letters, digits, '-' and '_')."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._phases.append((name, time.perf_counter() - start))

    def header(self) -> str:
        """``name;dur=<ms>`` for each phase, then ``total``: the handler so far (what follows is sending)."""
        total = time.perf_counter() - self._start
        return ", ".join(f"{name};dur={seconds * 1000:.2f}" for name, seconds in [*self._phases, ("total", total)])
