"""The worker's Celery app: ``celery -A worker.celery_app worker --pool solo``.

Settings are read once here, from ``SSD_*`` variables. A daemon thread beats the worker's
heartbeat into Redis (``/readyz`` lists the workers seen); it keeps beating while the solo
pool is busy training, when Celery's own remote control cannot answer.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from worker.queue import make_celery
from worker.settings import Settings
from worker.store import Store

settings = Settings()
app = make_celery(settings, include_tasks=True)
log = logging.getLogger(__name__)

_node = {"name": f"ssd-worker-{os.getpid()}@{socket.gethostname()}"}
_stop_heartbeat = threading.Event()
_store: Store | None = None


def store() -> Store:
    """The worker process's job store, connected on first use."""
    global _store
    if _store is None:
        _store = Store.from_url(settings.redis_url, settings.key_prefix)
    return _store


def node_name() -> str:
    return _node["name"]


@celeryd_after_setup.connect
def _remember_node_name(sender: str, **_kwargs) -> None:
    _node["name"] = sender


def _beat() -> None:
    while True:
        try:
            store().worker_heartbeat(node_name())
        except Exception as error:  # Redis away for a moment: try again at the next beat
            log.warning("worker heartbeat failed: %s", error)
        if _stop_heartbeat.wait(settings.worker_heartbeat_seconds):
            return


@worker_ready.connect
def _start_heartbeat(**_kwargs) -> None:
    threading.Thread(target=_beat, name="ssd-heartbeat", daemon=True).start()


@worker_shutdown.connect
def _stop_heartbeat_and_sign_off(**_kwargs) -> None:
    _stop_heartbeat.set()
    try:
        store().worker_gone(node_name())
    except Exception as error:
        log.warning("could not remove the worker's heartbeat: %s", error)
