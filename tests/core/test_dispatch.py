"""Task messages in the broker (real Redis, real Celery client): found while they wait in the
queue; a job whose recorded message never reached the queue, or was taken by a worker that died
before starting it, is sent again."""

from __future__ import annotations

import time
import uuid
from functools import partial

import pytest

from core.dispatch import dispatch, make_celery, task_ids_in_broker
from core.records import JobRecord
from core.settings import Settings
from core.store import Store
from tests.support.service import DATASET
from worker.reaper import Reaper


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def broker(redis_server, tmp_path):
    """A store, its settings (2 s leases) and a Celery client, under a key prefix of their own."""
    prefix = f"queue-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=redis_server.url, key_prefix=prefix, data_dir=tmp_path, lease_seconds=2, worker_heartbeat_seconds=1
    )
    store = Store.from_url(redis_server.url, prefix=prefix)
    store.put_dataset(DATASET)
    celery = make_celery(settings)
    yield store, settings, celery
    celery.close()
    store.redis.close()


def _checking_reaper(store: Store, settings: Settings) -> tuple[Reaper, list[str], _Clock]:
    """A reaper that looks in the broker's queue, with a hand-moved clock; it collects the ids it sends."""
    sent: list[str] = []
    clock = _Clock()
    broker_task_ids = partial(task_ids_in_broker, store.redis, settings)
    return Reaper(store, settings, sent.append, clock, broker_task_ids=broker_task_ids), sent, clock


def _queue(store: Store, job_id: str) -> None:
    assert store.create_job(JobRecord.new(job_id, DATASET, {"epochs": 1}))


def test_a_sent_message_is_found_while_it_waits_and_not_once_a_worker_took_it(broker):
    store, settings, celery = broker
    _queue(store, "j1")
    dispatch(celery, store, "j1", settings.queue)
    task_id = store.get_job("j1").dispatch_id
    assert task_id in task_ids_in_broker(store.redis, settings)
    assert uuid.uuid4().hex not in task_ids_in_broker(store.redis, settings)

    with celery.connection_for_read() as connection:  # a worker takes it (acks late)
        message = connection.default_channel.basic_get(settings.queue, no_ack=False)
        assert message.headers["id"] == task_id
        assert task_id not in task_ids_in_broker(store.redis, settings)
        message.ack()


def test_the_reaper_resends_a_recorded_message_that_never_reached_the_broker(broker):
    store, settings, celery = broker
    reaper, sent, clock = _checking_reaper(store, settings)
    _queue(store, "sent")
    dispatch(celery, store, "sent", settings.queue)
    _queue(store, "lost")
    store.mark_dispatch("lost", "never-sent")  # its sender died before send_task
    time.sleep(1.1)  # both jobs are now older than half a lease

    assert reaper.run_once() == []  # missing once: a worker may just have taken it
    clock.now += 1
    assert reaper.run_once() == ["dispatched lost"] and sent == ["lost"]
    assert store.get_job("lost").dispatch_id is None  # the test's dispatch only collects ids
    clock.now += 1
    assert reaper.run_once() == [] and sent == ["lost"]  # the claim lasts a lease: nothing twice


def test_the_reaper_resends_a_job_whose_message_a_dead_worker_took(broker):
    store, settings, celery = broker
    reaper, sent, clock = _checking_reaper(store, settings)
    _queue(store, "taken")
    dispatch(celery, store, "taken", settings.queue)
    connection = celery.connection_for_read()
    message = connection.default_channel.basic_get(settings.queue, no_ack=False)
    assert message is not None  # taken, never acked, the job never started: its worker died
    time.sleep(1.1)

    assert reaper.run_once() == []
    clock.now += 1
    assert reaper.run_once() == ["dispatched taken"] and sent == ["taken"]
    connection.release()


def test_without_a_broker_check_a_recorded_message_is_trusted(broker):
    store, settings, _ = broker
    sent: list[str] = []
    clock = _Clock()
    reaper = Reaper(store, settings, sent.append, clock)
    _queue(store, "lost")
    store.mark_dispatch("lost", "never-sent")
    time.sleep(1.1)
    for _ in range(3):
        reaper.run_once()
        clock.now += 1
    assert sent == []


def test_a_broker_that_cannot_be_read_makes_the_reaper_send_nothing_on_a_guess(broker):
    store, settings, _ = broker
    sent: list[str] = []
    clock = _Clock()

    def unreadable() -> set[str]:
        raise ConnectionError("broker away")

    reaper = Reaper(store, settings, sent.append, clock, broker_task_ids=unreadable)
    _queue(store, "waiting")
    store.mark_dispatch("waiting", uuid.uuid4().hex)
    _queue(store, "orphan")  # no message recorded at all: sent whatever the broker says
    time.sleep(1.1)
    for _ in range(3):
        reaper.run_once()
        clock.now += 1
    assert sent == ["orphan"]
