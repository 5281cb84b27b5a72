"""Sending training tasks to Celery by name, and Celery's configuration, shared by the worker and the API.

The API builds its own Celery client here and sends tasks by name (``send_task``), so neither it
nor ``core`` imports the worker's Celery app or the training code. Why each setting, and how a
job's ``dispatch_id`` tells a message on its way from a lost one: docs/jobs.md.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Sequence

import redis
from celery import Celery
from kombu.exceptions import KombuError

from core.settings import Settings
from core.store import Store

log = logging.getLogger(__name__)

TRAIN_TASK = "ssd.train"
# What sending a task raises while the broker (Redis) is away.
SEND_ERRORS = (redis.RedisError, OSError, KombuError)
# Kombu's Redis transport keeps one list per queue and priority level: priority 0 is the
# bare queue name, others add this separator and the level.
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)
_TASK_ID = re.compile(r"[0-9a-f]{32}")


def make_celery(settings: Settings, task_modules: Sequence[str] = ()) -> Celery:
    """A Celery app on ``settings.redis_url``. The API's sends tasks by name (``TRAIN_TASK``) and imports
    none; a worker's names its ``task_modules``, which Celery imports when the worker starts."""
    app = Celery("ssd", broker=settings.redis_url, include=list(task_modules))
    timeout = settings.visibility_timeout_seconds
    app.conf.update(
        task_default_queue=settings.queue,
        task_routes={TRAIN_TASK: {"queue": settings.queue}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker outlives a Redis restart, however long
        broker_transport_options={
            "visibility_timeout": timeout,
            "global_keyprefix": f"{settings.key_prefix}:celery:",
            "unacked_restore_interval": max(1, min(10, timeout // 20)),
            "unacked_restore_throttle": max(1, min(10, timeout // 200)),
            "socket_timeout": 30,
            "socket_connect_timeout": 5,
        },
    )
    return app


def enqueue_training(celery: Celery, job_id: str, queue: str, task_id: str | None = None) -> None:
    """Send the training task for ``job_id`` (the id only) to the training queue."""
    celery.send_task(TRAIN_TASK, args=[job_id], queue=queue, task_id=task_id)


def dispatch(celery: Celery, store: Store, job_id: str, queue: str) -> None:
    """Send the job's task, its id recorded first as the job's ``dispatch_id`` (cleared again if
    the send fails), so the reaper tells a message on its way from a lost one."""
    task_id = uuid.uuid4().hex
    store.mark_dispatch(job_id, task_id)
    try:
        enqueue_training(celery, job_id, queue, task_id)
    except SEND_ERRORS:
        store.clear_dispatch(job_id, task_id)
        raise


def send_quietly(dispatch: Callable[[str], None], job_id: str) -> None:
    """Send the job's task; a failure is only logged, since a reaper's next pass finds the queued
    job with no message on its way and sends it then."""
    try:
        dispatch(job_id)
    except SEND_ERRORS as error:
        log.error("could not send the task of job %s (%s); a reaper sends it on a later pass", job_id, error)


def task_ids_in_broker(client: redis.Redis, settings: Settings) -> set[str]:
    """The task ids of the training messages waiting in the broker's queue for a worker.

    A message a worker has taken (kombu's ``unacked`` hash) does not count: a live worker
    starts the job within moments of taking it (the job is then leased), so a queued job
    whose message stays taken belongs to a worker that died first, and until the visibility
    timeout restores that message (hours) nothing else would run the job.

    Ids are taken as every run of 32 hex digits in the messages' raw text (the form of the
    ids ``dispatch`` makes) rather than parsed out of each message, so a change of the message
    layout cannot hide a message that is there; another such run in a message only ever
    makes a lost message look present. The lists hold every message not yet taken, those of
    cancelled jobs included.
    """
    prefix = f"{settings.key_prefix}:celery:"
    lists = [settings.queue + (f"{_PRIORITY_SEPARATOR}{step}" if step else "") for step in _PRIORITY_STEPS]
    pipe = client.pipeline(transaction=False)
    for name in lists:
        pipe.lrange(prefix + name, 0, -1)
    return {task_id for found in pipe.execute() for message in found for task_id in _TASK_ID.findall(message)}
