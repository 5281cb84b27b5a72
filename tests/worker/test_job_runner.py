"""The worker's job logic without Celery (real Redis): leases, the monitor thread, the reaper, rebuilds."""

from __future__ import annotations

import time
from pathlib import Path

from core.lease import Lease
from core.records import JobRecord
from core.run_files import read_job_file, save_job_file
from core.settings import Settings
from core.store import Store
from model.training import StepProgress
from tests.support.processes import wait_until
from tests.support.service import DATASET, TINY, wait_for_job
from worker.job_runner import run_job, training_config, where_it_runs
from worker.lease_monitor import JobMonitor
from worker.reaper import Reaper


def _queue(store: Store, job_id: str = "j1", epochs: int = 2, data_dir: Path | None = None) -> JobRecord:
    """A queued job, with its run folder under ``data_dir`` when given (as POST /train makes it)."""
    record = store.create_job(JobRecord.new(job_id, DATASET, {"epochs": epochs}))
    assert record is not None
    if data_dir is not None:
        save_job_file(Settings(data_dir=data_dir).layout.run_dir(job_id), record, create=True)
    return record


def _start(
    store: Store, job_id: str = "j1", ttl: float = 30, worker: str = "me", data_dir: Path | None = None
) -> Lease:
    _queue(store, job_id, data_dir=data_dir)
    lease = store.leases.acquire(job_id, f"{worker}/tok", ttl_seconds=ttl)
    assert lease is not None and store.start_job(lease, worker)[0] == "queued"
    return lease


def test_a_job_leased_by_another_worker_is_not_run_twice(fresh, tmp_path):
    _queue(fresh)
    fresh.mark_dispatch("j1", "message-1")
    assert fresh.leases.acquire("j1", "another-worker", ttl_seconds=30)
    assert run_job("j1", fresh, Settings(data_dir=tmp_path), "me", task_id="message-1") == "skipped: leased"
    assert fresh.get_job("j1").status == "queued" and fresh.leases.holder("j1") == "another-worker"
    assert fresh.get_job("j1").dispatch_id is None  # taken: the reaper knows no message is on its way


def test_a_cancelled_or_running_job_is_not_started(fresh, tmp_path):
    _queue(fresh)
    fresh.request_cancel("j1")
    assert run_job("j1", fresh, Settings(data_dir=tmp_path), "me") == "skipped: cancelled"
    assert fresh.leases.holder("j1") is None and not (tmp_path / "runs" / "j1").exists()
    assert run_job("no-such-job", fresh, Settings(data_dir=tmp_path), "me") == "missing"
    lease = _start(fresh, "j2")
    fresh.redis.delete(lease.key)  # its run is gone: the reaper puts it back, a delivery does not take it
    assert run_job("j2", fresh, Settings(data_dir=tmp_path), "me") == "skipped: running"
    assert fresh.get_job("j2").restarts == 0


def _step(epoch: int, step: int) -> StepProgress:
    return StepProgress(epoch, step, 50, 2, 1.0, 10.0, 60.0)


def test_the_monitor_thread_writes_progress_cancels_and_appends_each_epoch_once(fresh):
    lease = _start(fresh)
    with JobMonitor(fresh, lease, cancel_interval=0.02, progress_interval=10) as monitor:
        for step in range(1, 50):
            monitor.on_step(_step(1, step))
        wait_until(lambda: fresh.get_job("j1").progress or None, 5, "progress")
        for step in range(50, 60):
            monitor.on_step(_step(1, step))
        time.sleep(0.2)
        assert fresh.get_job("j1").progress.step < 50  # at most one write per progress interval

        # A resumed run: the checkpoint's history has epoch 1, which the stream lacks.
        monitor.on_resume([{"epoch": 1, "train_loss": 2.0, "val_loss": 1.5}])
        monitor.on_epoch({"epoch": 2, "train_loss": 1.0, "val_loss": 1.7})
        wait_until(lambda: len(fresh.losses("j1")) == 2, 5, "two epochs in the stream")

        assert not monitor.should_stop()
        fresh.request_cancel("j1")
        wait_until(monitor.should_stop, 5, "the cancel flag")
        assert monitor.drain(5)
    job = fresh.get_job("j1")
    assert [(r["epoch"], r["train_loss"]) for r in fresh.losses("j1")] == [(1, 2.0), (2, 1.0)]
    assert job.best_val_loss == 1.5 and job.epochs_completed == 2


def test_epoch_records_wait_out_a_redis_outage_in_order(fresh):
    lease = _start(fresh)
    monitor = JobMonitor(fresh, lease, cancel_interval=0.02, progress_interval=0.1)
    real_sync = fresh.sync_epochs
    failing = {"on": True}

    def sync(*args, **kwargs):
        if failing["on"]:
            raise ConnectionError("Redis is away")
        return real_sync(*args, **kwargs)

    fresh.sync_epochs = sync
    with monitor:
        monitor.on_epoch({"epoch": 1, "train_loss": 3.0})
        monitor.on_epoch({"epoch": 2, "train_loss": 2.0})
        time.sleep(0.2)  # training goes on meanwhile: nothing here blocks
        assert fresh.losses("j1") == [] and not monitor.should_stop()
        failing["on"] = False
        assert monitor.drain(5)
    assert [r["epoch"] for r in fresh.losses("j1")] == [1, 2]


def test_a_run_that_cannot_renew_its_lease_stops_before_it_expires(fresh):
    lease = _start(fresh, ttl=1.2)
    renewals = {"fail": False}
    real_renew = fresh.leases.renew

    def renew(held):
        if renewals["fail"]:
            raise ConnectionError("cut off from Redis")
        return real_renew(held)

    fresh.leases.renew = renew
    with JobMonitor(fresh, lease, cancel_interval=0.02, progress_interval=0.1) as monitor:
        time.sleep(1.0)  # renewals keep it trusted beyond three quarters of a TTL
        assert not monitor.should_stop()
        renewals["fail"] = True
        cut = time.monotonic()
        wait_until(monitor.should_stop, 3, "the run to stop trusting its lease")
        # It stops before the lease expires in Redis (it was renewed at most 0.4 s before the cut).
        assert time.monotonic() - cut < 1.2
        assert fresh.leases.holder("j1") == lease.token  # still held in Redis: nobody else took over yet


def test_a_runner_that_lost_its_lease_cannot_record_the_end(fresh):
    mine = _start(fresh)
    fresh.redis.set(fresh.lease_key("j1"), "someone-else")
    assert fresh.finish_job(mine, "succeeded") is None
    assert fresh.requeue_job("j1", "paused", lease=mine) is None
    assert fresh.get_job("j1").status == "running"
    fresh.redis.set(fresh.lease_key("j1"), mine.token)
    assert fresh.finish_job(mine, "succeeded", epoch=2).status == "succeeded"
    assert fresh.leases.holder("j1") is None and fresh.unleased_jobs() == []


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _reaper(store: Store, settings: Settings, sent: list[str], clock=None) -> Reaper:
    """A reaper that has made its first pass (the rebuild from an empty data folder)."""
    reaper = Reaper(store, settings, sent.append, clock or time.monotonic)
    reaper.run_once()
    return reaper


def test_the_reaper_requeues_a_running_job_whose_lease_is_gone(fresh, tmp_path):
    sent: list[str] = []
    clock = _Clock()
    settings = Settings(data_dir=tmp_path, lease_seconds=10, worker_heartbeat_seconds=1)
    _start(fresh, "alive", worker="worker-a", data_dir=tmp_path)
    dead = _start(fresh, "dead", worker="worker-a", data_dir=tmp_path)
    fresh.redis.delete(dead.key)
    reaper = _reaper(fresh, settings, sent, clock)
    assert sent == []  # the lease of "dead" is missing, but not for long enough yet
    clock.now += 5
    assert reaper.run_once() == ["requeued dead"] and sent == ["dead"]
    job = fresh.get_job("dead")
    assert job.status == "queued" and job.restarts == 1 and job.crashes == 1 and "worker-a" in job.restart_reason
    assert read_job_file(settings.layout.run_dir("dead")) == job  # the change reached job.json
    assert fresh.get_job("alive").status == "running"
    assert fresh.get_job("dead").dispatch_id is None  # the test's dispatch only collects ids
    fresh.mark_dispatch("dead", "message-2")
    clock.now += 5
    assert reaper.run_once() == []  # a message is on its way: nothing to do


def test_the_reaper_fails_a_job_that_keeps_crashing_its_worker(fresh, tmp_path):
    sent: list[str] = []
    clock = _Clock()
    settings = Settings(data_dir=tmp_path, lease_seconds=10, worker_heartbeat_seconds=1, max_job_restarts=1)
    reaper = _reaper(fresh, settings, sent, clock)
    lease = _start(fresh, worker="w", data_dir=tmp_path)
    outcomes = []
    for attempt in range(2):
        if attempt:  # the requeued job, taken by the next worker
            lease = fresh.leases.acquire("j1", f"w/{attempt}", 10)
            assert fresh.start_job(lease, "w")[0] == "queued"
        fresh.redis.delete(lease.key)  # killed (out of memory) without a word
        reaper.run_once()
        clock.now += 6
        outcomes += reaper.run_once()
    assert outcomes == ["requeued j1", "failed j1"] and sent == ["j1"]
    job = fresh.get_job("j1")
    assert (
        job.status == "failed" and job.crashes == 2 and "2 times" in job.error and "SSD_MAX_JOB_RESTARTS" in job.error
    )
    assert read_job_file(settings.layout.run_dir("j1")).status == "failed"


def test_the_reaper_sends_a_queued_job_that_no_message_will_reach(fresh, tmp_path):
    sent: list[str] = []
    settings = Settings(data_dir=tmp_path, lease_seconds=2, worker_heartbeat_seconds=1)
    reapers = [_reaper(fresh, settings, sent) for _ in range(2)]
    _queue(fresh, "waiting")
    fresh.mark_dispatch("waiting", "message-w")  # its message is in the queue
    _queue(fresh, "orphan")
    fresh.mark_dispatch("orphan", "message-o1")
    fresh.mark_dispatch("orphan", "message-o2")  # sent again (after a pause)
    assert not fresh.clear_dispatch("orphan", "message-o1")  # a late redelivery of the old message
    assert fresh.clear_dispatch("orphan", "message-o2")  # taken by a worker that found it leased, and acked
    time.sleep(1.1)
    for reaper in reapers:  # two workers' reapers: one message
        reaper.run_once()
    assert sent == ["orphan"]


def _saved_run(settings: Settings, job: JobRecord, epochs: int) -> None:
    run_dir = settings.layout.run_dir(job.id)
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text(job.model_dump_json())
    lines = "".join(f'{{"epoch": {e}, "train_loss": 1.0}}\n' for e in range(1, epochs + 1))
    (run_dir / "metrics.jsonl").write_text(lines)


def test_records_redis_lost_are_rebuilt_from_the_data_folder(fresh, tmp_path):
    settings = Settings(data_dir=tmp_path)
    dataset = DATASET.model_copy(update={"id": "d9", "name": "lost", "created_at": "2026-01-01T00:00:00Z"})
    (settings.datasets_dir / "d9").mkdir(parents=True)
    (settings.datasets_dir / "d9" / "dataset.json").write_text(dataset.model_dump_json())
    job = JobRecord.new("x", dataset, {"epochs": 3}).model_copy(update={"revision": 7})
    saved = {
        "done": (
            job.model_copy(update={"id": "done", "status": "succeeded", "finished_at": "2026-01-02T00:00:00Z"}),
            3,
        ),
        "busy": (job.model_copy(update={"id": "busy", "status": "running", "lease_token": "w/1"}), 1),
        "waiting": (job.model_copy(update={"id": "waiting"}), 0),
        "stopping": (job.model_copy(update={"id": "stopping", "status": "running", "cancel_requested": True}), 2),
        "dropped": (job.model_copy(update={"id": "dropped", "status": "cancelled", "cancel_requested": True}), 0),
    }
    for record, epochs in saved.values():
        _saved_run(settings, record, epochs)
    sent: list[str] = []
    actions = Reaper(fresh, settings, sent.append).run_once()
    assert sorted(actions) == [
        "restored dataset d9",
        "restored job busy (queued)",
        "restored job done (succeeded)",
        "restored job dropped (cancelled)",
        "restored job stopping (cancelled)",
        "restored job waiting (queued)",
    ]
    assert fresh.get_dataset("d9").name == "lost"
    assert fresh.get_job("done").status == "succeeded" and len(fresh.losses("done")) == 3
    assert fresh.newest_succeeded_job() == "done"
    busy = fresh.get_job("busy")
    assert busy.status == "queued" and busy.restarts == 1 and "rebuilt" in busy.restart_reason
    assert busy.lease_token is None and busy.epochs_completed == 1 and busy.revision == 8
    assert [r["epoch"] for r in fresh.losses("busy")] == [1]
    waiting = fresh.get_job("waiting")
    assert waiting.status == "queued" and waiting.restarts == 0  # it never ran: it trains once, from the start
    assert fresh.get_job("stopping").status == "cancelled"  # the cancel asked before Redis was lost holds
    assert fresh.get_job("dropped").status == "cancelled"
    assert sorted(sent) == ["busy", "waiting"]
    assert read_job_file(settings.layout.run_dir("busy")) == busy  # and job.json follows
    assert Reaper(fresh, settings, sent.append).run_once() == []  # nothing twice
    assert sorted(sent) == ["busy", "waiting"]


def test_a_flushed_redis_is_noticed_by_a_running_reaper(fresh, tmp_path):
    settings = Settings(data_dir=tmp_path)
    sent: list[str] = []
    reaper = _reaper(fresh, settings, sent)
    _saved_run(settings, JobRecord.new("j1", DATASET, {"epochs": 1}), 0)
    assert reaper.run_once() == []  # Redis has lost nothing: the data folder is not read
    fresh.redis.delete(*fresh.redis.keys(f"{fresh.prefix}:*"))  # what a FLUSHALL does to this store
    fresh.put_dataset(DATASET)
    assert reaper.run_once() == ["restored job j1 (queued)"] and sent == ["j1"]


def test_a_worker_taking_a_job_redis_kept_stale_corrects_it_first(fresh, tmp_path):
    """Redis restarted without the job's cancel, which its job.json has, and a worker takes its message
    before any reaper compared Redis with the data folder: the job does not train."""
    settings = Settings(data_dir=tmp_path)
    queued = _queue(fresh, data_dir=tmp_path)
    cancelled = queued.model_copy(update={"status": "cancelled", "cancel_requested": True, "revision": 5})
    save_job_file(settings.layout.run_dir("j1"), cancelled)
    fresh.set_marker("the server before this one")  # no reaper has seen this server yet
    assert run_job("j1", fresh, settings, "me") == "skipped: cancelled"
    corrected = fresh.get_job("j1")
    assert corrected.status == "cancelled" and corrected.revision == 6
    assert fresh.list_jobs("queued").items == [] and [j.id for j in fresh.list_jobs("cancelled").items] == ["j1"]


def test_a_job_that_cannot_run_ends_failed_with_the_reason(client, worker, settings):
    dataset = client.post("/datasets/synthetic", json={"num_images": 2, "image_size": 100}).json()
    # An image deleted from the dataset folder behind the service's back.
    image = next((settings.datasets_dir / dataset["id"]).rglob("*.jpg"))
    image.unlink()
    job = client.post("/train", json={"dataset_id": dataset["id"], "epochs": 1, **TINY}).json()
    failed = wait_for_job(client, job["id"], ("failed", "succeeded"), timeout=60)
    assert failed["status"] == "failed" and image.name in failed["error"] and failed["finished_at"]
    assert client.delete(f"/datasets/{dataset['id']}").status_code == 204


def test_the_record_says_where_and_in_which_precision_the_job_trains(fresh, tmp_path, monkeypatch):
    job = _queue(fresh, "j9")
    monkeypatch.setattr("model.device.cpu_has_native_bf16", lambda: True)
    settings = Settings(data_dir=tmp_path, device="cpu")
    assert where_it_runs(job, settings) | {"host": None} == {
        "host": None,
        "device": "cpu",
        "precision": "bf16",
        "gpu": None,
    }
    assert training_config(job, settings).amp
    # SSD_CPU_PRECISION=fp32 turns bf16 off on this worker's CPU, and the record says so.
    forced = Settings(data_dir=tmp_path, device="cpu", cpu_precision="fp32")
    assert where_it_runs(job, forced)["precision"] == "fp32" and not training_config(job, forced).amp
    monkeypatch.setattr("model.device.cpu_has_native_bf16", lambda: False)
    assert where_it_runs(job, settings)["precision"] == "fp32"
