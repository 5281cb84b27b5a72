"""The worker's Celery app: ``celery -A worker.celery_app worker --pool solo``.

Settings are read once here, from ``SSD_*`` variables. A daemon thread beats the worker's
heartbeat into Redis (``/readyz`` lists the workers seen) and runs the reaper
(``worker.reaper``) after each beat; it keeps going while the solo pool is busy training,
when Celery's own remote control cannot answer.

Shutdown: Celery's warm shutdown (SIGTERM) would wait for the whole training task. Its
``worker_shutting_down`` signal sets ``SHUTDOWN`` instead, which the running job reads
before every batch: it writes a checkpoint, goes back to the queue and the task returns at
once, so the worker exits within about a batch (Compose's ``stop_grace_period`` only needs
to cover one batch and one checkpoint).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from functools import partial

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown, worker_shutting_down

from core.cpu_threads import host_cores, threads_line, use_threads
from core.dispatch import dispatch, make_celery, task_ids_in_broker
from core.leftovers import start_sweep
from core.settings import Settings
from core.storage import StorageUnavailable
from core.store import REDIS_ERRORS, Store
from worker.job_runner import device_type
from worker.reaper import Reaper

settings = Settings()
app = make_celery(settings, task_modules=["worker.tasks"])
log = logging.getLogger(__name__)
use_threads(host_cores())  # before anything computes; a job shares them with the API (core.cpu_threads)

SHUTDOWN = threading.Event()  # the worker is stopping: a running job pauses at its next batch

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


def send_again(job_id: str) -> None:
    """Send the job's training task (after a pause, or from the reaper)."""
    dispatch(app, store(), job_id, settings.queue)


@celeryd_after_setup.connect
def _remember_node_name(sender: str, **_kwargs) -> None:
    _node["name"] = sender


def _beat() -> None:
    reaper = Reaper(store(), settings, send_again, broker_task_ids=partial(task_ids_in_broker, store().redis, settings))
    device = device_type(settings.device)  # where it trains: fixed for the process, asked once
    while True:
        try:
            store().worker_heartbeat(node_name(), device)
        except REDIS_ERRORS as error:  # Redis away for a moment: try again at the next beat
            log.warning("worker heartbeat failed: %s", error)
        if not SHUTDOWN.is_set():
            _reap(reaper)
        if _stop_heartbeat.wait(settings.worker_heartbeat_seconds):
            return


def _reap(reaper: Reaper) -> None:
    try:
        for action in reaper.run_once():
            log.info("reaper: %s", action)
    except REDIS_ERRORS as error:
        log.warning("reaper pass failed (Redis unreachable?): %s", error)
    except Exception:  # a bug must not stop the heartbeat: logged in full, and the next pass tries again
        log.exception("reaper pass failed")


@worker_ready.connect
def _start_heartbeat(**_kwargs) -> None:
    log.info("%s", threads_line(settings))
    # This process's owner lock before anything is written, then the sweep.
    start_sweep(settings.layout, store(), settings.storage)
    try:
        settings.storage.check(thorough=True)
    except StorageUnavailable as error:  # jobs fail saying so until it can be reached
        log.error("%s: jobs this worker takes fail until it can be reached", error)
    threading.Thread(target=_beat, name="ssd-heartbeat", daemon=True).start()


@worker_shutting_down.connect
def _pause_training(sig: str = "", how: str = "", **_kwargs) -> None:
    # Runs inside Celery's signal handler: only set a flag.
    SHUTDOWN.set()


@worker_shutdown.connect
def _stop_heartbeat_and_sign_off(**_kwargs) -> None:
    _stop_heartbeat.set()
    try:
        store().worker_gone(node_name())
    except REDIS_ERRORS as error:
        log.warning("could not remove the worker's heartbeat: %s", error)
