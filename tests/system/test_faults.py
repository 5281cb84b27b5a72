"""Fault injection with real processes: a worker SIGKILLed, SIGTERMed, frozen (SIGSTOP) or cut off
from Redis mid-epoch, a job that keeps killing its worker, two workers racing for one job past
Celery's visibility timeout, Redis stopped and restarted (AOF), emptied, or losing an entry.
The scenarios share a Redis of their own (AOF on, in a temporary folder) and an API (see
``tests.support.faults``); each starts its own workers, with short leases, so recovery takes
seconds, not minutes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator

import pytest

from tests.support.faults import (
    JOB,
    CuttableProxy,
    Service,
    epochs,
    into_epoch_two,
    metrics_epochs,
    start_service,
    stop_service,
    train_into_epoch_two,
)
from tests.support.processes import start_redis, wait_until
from tests.support.service import wait_for_job


@pytest.fixture(scope="module")
def service(tmp_path_factory, log_dir) -> Iterator[Service]:
    """One service for the module; workers are up to each test."""
    service = start_service(tmp_path_factory.mktemp("faults"), log_dir)
    try:
        yield service
    finally:
        stop_service(service)


@pytest.fixture
def faults(service) -> Iterator[Service]:
    """The shared service; the workers a test starts are killed after it."""
    yield service
    for process in service.workers:
        process.stop(signal.SIGKILL)
    service.workers.clear()


def test_a_sigkilled_worker_is_replaced_and_the_job_resumes(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    first = service.start_worker("doomed")
    with service.client() as client:
        job = train_into_epoch_two(client, dataset_id)
        os.kill(first.popen.pid, signal.SIGKILL)  # no goodbye: the lease just stops being renewed
        first.popen.wait(10)
        service.start_worker("heir")
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded", (done, service.worker_logs()[-3000:])
        assert epochs(client, job["id"]) == [1, 2, 3]  # no gap, no repeat
        assert done["restarts"] >= 1 and "expired" in done["restart_reason"], done
        assert done["epochs_completed"] == 3 and done["worker"].startswith("heir@")

    # The resumed run went on from epoch 1's checkpoint exactly as an uninterrupted run does.
    from model.config import TrainConfig
    from model.data import read_dataset
    from model.training import fit

    config = TrainConfig.from_dict(
        json.loads((service.data_dir / "runs" / job["id"] / "config.json").read_text())["train_config"]
    )
    data = read_dataset(next((service.data_dir / "datasets" / dataset_id).glob("files*")))
    alone = fit(config, data, tmp_path / "uninterrupted")
    resumed = [
        json.loads(line) for line in (service.data_dir / "runs" / job["id"] / "metrics.jsonl").read_text().splitlines()
    ]
    for mine, theirs in zip(resumed, alone.history, strict=True):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4), (mine, theirs)


def test_two_workers_past_the_visibility_timeout_train_a_job_once(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    service.start_worker("one")
    service.start_worker("two")
    with service.client() as client:
        # 8 epochs: at least 5 s even on a fast machine, well past the 2 s visibility timeout.
        job = client.post("/train", json={"dataset_id": dataset_id, **JOB, "epochs": 8}).json()
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded" and done["restarts"] == 0, done
        assert epochs(client, job["id"]) == list(range(1, 9))
    logs = service.worker_logs()
    assert logs.count(f"job {job['id']}: training on") == 1, logs[-3000:]
    # The message was delivered again while the job ran (longer than the 3 s visibility timeout),
    # and that delivery found the job running under its lease and left it alone.
    assert f"job {job['id']} is running; not starting it" in logs, logs[-3000:]


def test_sigterm_pauses_the_job_which_another_worker_finishes(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    first = service.start_worker("leaving")
    with service.client() as client:
        job = train_into_epoch_two(client, dataset_id)
        stopped = time.monotonic()
        first.popen.send_signal(signal.SIGTERM)
        assert first.popen.wait(30) == 0, first.tail()
        assert time.monotonic() - stopped < 15  # one batch and a checkpoint, not the whole job
        paused = client.get(f"/jobs/{job['id']}").json()
        assert paused["status"] == "queued" and paused["restarts"] == 1, paused
        finished = epochs(client, job["id"])
        assert finished == list(range(1, len(finished) + 1)) and 1 <= len(finished) < JOB["epochs"]
        assert f"shut down in epoch {len(finished) + 1}" in paused["restart_reason"], paused
        assert paused["epoch"] == len(finished) and paused["epochs_completed"] == len(finished)
        assert (service.data_dir / "runs" / job["id"] / "last.pt").is_file()

        service.start_worker("arriving")
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded" and done["restarts"] == 1, done
        assert epochs(client, job["id"]) == [1, 2, 3]
        assert done["started_at"] == paused["started_at"]


def test_a_redis_restart_loses_nothing_and_the_api_recovers(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    service.start_worker("steady")
    with service.client() as client:
        job = client.post("/train", json={"dataset_id": dataset_id, **JOB}).json()
        queued = client.post("/train", json={"dataset_id": dataset_id, **JOB, "epochs": 1}).json()
        into_epoch_two(client, job["id"])

        service.redis.process.stop(signal.SIGTERM)  # writes out its AOF and exits
        down = client.get(f"/jobs/{job['id']}")
        assert down.status_code == 503 and "Redis" in down.json()["detail"], down.text
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        time.sleep(4)  # longer than the 3 s lease: the runner must take it back
        restarted = start_redis(
            service.redis.folder,
            service.log_dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            port=service.redis.port,
        )
        service.redis = restarted

        wait_until(lambda: client.get(f"/jobs/{job['id']}").status_code == 200, 30, "the API to recover")
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded", (done, service.worker_logs()[-3000:])
        assert epochs(client, job["id"]) == [1, 2, 3]
        second = wait_for_job(client, queued["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert second["status"] == "succeeded" and epochs(client, queued["id"]) == [1]
        assert client.get("/readyz").status_code == 200


def test_records_redis_lost_are_rebuilt_from_the_data_folder(faults, tmp_path):
    service, dataset_id = faults, faults.dataset_id
    service.start_worker("rebuilder")
    with service.client() as client:
        job = train_into_epoch_two(client, dataset_id)

        # Redis comes back from a different, empty folder: every record and queued message is gone.
        service.redis.process.stop(signal.SIGKILL)
        empty = service.redis.folder.parent / "redis-empty"
        service.redis = start_redis(empty, service.log_dir, "--appendonly", "yes", port=service.redis.port)

        # A worker sees the new server: datasets and jobs come back from their folders, and the
        # unfinished job is queued again and resumes from its checkpoint.
        wait_until(lambda: client.get(f"/datasets/{dataset_id}").status_code == 200, 30, "the dataset rebuilt")
        # Jobs come back after the datasets they use: until then the job is unknown (404).
        wait_until(lambda: client.get(f"/jobs/{job['id']}").status_code == 200, 30, "the job rebuilt")
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded", (done, service.worker_logs()[-3000:])
        assert "rebuilt from its run folder" in done["restart_reason"] and done["restarts"] >= 1
        assert epochs(client, job["id"]) == [1, 2, 3]


def _stale_run_changes_nothing(service: Service, stale, job: dict, resume) -> None:
    """Let a second worker finish ``job`` while ``stale`` is out of the way, then ``resume`` the stale
    one: the job's record, losses and run files stay exactly what the second worker left."""
    service.start_worker("heir")
    with service.client() as client:
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded" and done["worker"].startswith("heir@"), done
        left = (client.get(f"/jobs/{job['id']}").json(), epochs(client, job["id"]), service.run_files(job["id"]))
        resume()
        wait_until(lambda: "writes nothing more" in stale.log.read_text(), 30, "the stale run to give up")
        time.sleep(3)  # time for any late write it would still make (an epoch is about 1.5 s here)
        now = (client.get(f"/jobs/{job['id']}").json(), epochs(client, job["id"]), service.run_files(job["id"]))
    assert now == left
    every_epoch = list(range(1, job["epochs"] + 1))
    assert left[1] == every_epoch and metrics_epochs(service.run_dir(job["id"])) == every_epoch
    assert stale.alive(), stale.tail()  # it stopped the job's run, not itself


def test_a_frozen_worker_past_its_lease_writes_nothing_when_it_thaws(faults):
    service = faults
    frozen = service.start_worker("frozen")
    with service.client() as client:
        job = train_into_epoch_two(client, service.dataset_id)
    os.kill(frozen.popen.pid, signal.SIGSTOP)  # a GC pause, swap, a debugger: mid-epoch, for longer than the lease
    try:
        _stale_run_changes_nothing(service, frozen, job, lambda: os.kill(frozen.popen.pid, signal.SIGCONT))
    finally:
        os.kill(frozen.popen.pid, signal.SIGCONT)


def test_a_worker_cut_off_from_redis_stops_and_writes_nothing_when_it_reconnects(faults):
    service = faults
    proxy = CuttableProxy(service.redis.port)
    try:
        cut_off = service.start_worker("cut-off", SSD_REDIS_URL=proxy.url)
        with service.client() as client:
            # Longer than the lease's trusted part: the run cannot simply finish before it stops trusting it.
            job = train_into_epoch_two(client, service.dataset_id, epochs=6)
        proxy.cut()  # the worker's machine loses the network; its process trains on
        wait_until(lambda: "writes nothing more" in cut_off.log.read_text(), 10, "the cut-off run to stop")
        _stale_run_changes_nothing(service, cut_off, job, proxy.restore)
    finally:
        proxy.close()


def test_a_job_that_keeps_killing_its_worker_fails_saying_so(faults):
    """Each worker that takes the job dies under it (as the kernel's out-of-memory killer would kill
    it); with SSD_MAX_JOB_RESTARTS=1, the second such death ends the job."""
    service = faults
    limit = {"SSD_MAX_JOB_RESTARTS": "1"}
    workers = [service.start_worker(f"victim-{n}", **limit) for n in range(2)]
    with service.client() as client:
        job = client.post("/train", json={"dataset_id": service.dataset_id, **JOB, "epochs": 50}).json()
        for death in range(2):

            def taken(restarts: int = death) -> dict | None:
                found = client.get(f"/jobs/{job['id']}").json()
                return found if found["status"] == "running" and found["restarts"] == restarts else None

            running = wait_until(taken, 60, f"a worker to take the job after {death} deaths")
            victim = next(w for w in workers if running["worker"].startswith(f"{w.name}@"))
            os.kill(victim.popen.pid, signal.SIGKILL)
            workers.remove(victim)
            workers.append(service.start_worker(f"victim-{death + 2}", **limit))  # reapers stay alive
        failed = wait_for_job(client, job["id"], ("failed", "succeeded", "cancelled"), timeout=60)
    assert failed["status"] == "failed" and failed["crashes"] == 2 and failed["restarts"] == 1, failed
    assert "2 times" in failed["error"] and "SSD_MAX_JOB_RESTARTS is 1" in failed["error"], failed
    assert json.loads((service.run_dir(job["id"]) / "job.json").read_text())["status"] == "failed"


def test_a_cancel_asked_while_the_worker_is_dead_ends_the_job_cancelled(faults):
    service = faults
    doomed = service.start_worker("doomed")
    with service.client() as client:
        job = train_into_epoch_two(client, service.dataset_id)
        os.kill(doomed.popen.pid, signal.SIGKILL)
        doomed.popen.wait(10)
        asked = client.post(f"/jobs/{job['id']}/cancel").json()
        assert asked["status"] == "running" and asked["cancel_requested"]
        service.start_worker("reaper")
        done = wait_for_job(client, job["id"], ("cancelled", "succeeded", "failed"), timeout=60)
        assert done["status"] == "cancelled" and done["has_model"], done  # epoch 1's checkpoint stays
        time.sleep(2)
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"  # and it never ran again
    assert json.loads((service.run_dir(job["id"]) / "job.json").read_text())["status"] == "cancelled"
    assert service.worker_logs().count(f"job {job['id']}: training on") == 1


def test_an_epoch_redis_lost_comes_back(faults):
    service = faults
    service.start_worker("steady")
    with service.client() as client:
        job = train_into_epoch_two(client, service.dataset_id)
        # Epoch 1's entry lost as with the last second of an everysec append-only file: later epochs
        # could never be written before it again.
        service.store.redis.xdel(service.store.losses_key(job["id"]), "1-0")
        done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded", done
        assert epochs(client, job["id"]) == [1, 2, 3]  # the run wrote it again before its next epoch
        # Lost after the job ended: the losses still have no hole while the run folder has the epoch.
        service.store.redis.xdel(service.store.losses_key(job["id"]), "2-0")
        losses = client.get(f"/jobs/{job['id']}/losses").json()["losses"]
        assert [r["epoch"] for r in losses] == [1, 2, 3] and losses[1]["train_loss"] > 0
        assert [r["epoch"] for r in client.get(f"/jobs/{job['id']}/losses?after=1").json()["losses"]] == [2, 3]


def test_an_accepted_job_survives_redis_losing_everything_before_a_worker_starts(faults):
    service = faults
    with service.client() as client:
        waiting = client.post("/train", json={"dataset_id": service.dataset_id, **JOB, "epochs": 1}).json()
        dropped = client.post("/train", json={"dataset_id": service.dataset_id, **JOB, "epochs": 1}).json()
        assert client.post(f"/jobs/{dropped['id']}/cancel").json()["status"] == "cancelled"
        service.store.redis.flushall()  # every record and every task message gone
        assert client.get(f"/jobs/{waiting['id']}").status_code == 404

        service.start_worker("after-the-flood")  # it finds a Redis without the store's marker: rebuilds
        done = wait_for_job(client, waiting["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded" and done["restarts"] == 0, done
        assert epochs(client, waiting["id"]) == [1]
        assert client.get(f"/jobs/{dropped['id']}").json()["status"] == "cancelled"
        assert client.get(f"/datasets/{service.dataset_id}").status_code == 200
        time.sleep(2)
    logs = service.worker_logs()
    assert logs.count(f"job {waiting['id']}: training on") == 1, logs[-3000:]  # exactly once
    assert f"job {dropped['id']}: training on" not in logs


def test_a_redis_blip_as_a_job_starts_only_delays_it(faults):
    """Redis is away for a moment just as a run reads the job's dataset record: the run waits it out.
    The test holds the run folder's lock so that the run's claim, and with it everything after the
    job turned running, waits until Redis has been cut off from that worker."""
    service = faults
    proxy = CuttableProxy(service.redis.port)
    try:
        with service.client() as client:
            job = client.post("/train", json={"dataset_id": service.dataset_id, **JOB, "epochs": 1}).json()
            lock = os.open(service.run_dir(job["id"]) / ".lock", os.O_RDWR)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                # A longer lease than the other tests': the blip must not cost the run its lease.
                service.start_worker("blip", SSD_REDIS_URL=proxy.url, SSD_LEASE_SECONDS="10")
                wait_until(lambda: service.store.get_job(job["id"]).status == "running", 30, "the run to start")
                proxy.cut()
            finally:
                os.close(lock)  # the claim goes on, then the run reads the dataset's record
            time.sleep(2)
            proxy.restore()
            done = wait_for_job(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=120)
        assert done["status"] == "succeeded" and done["restarts"] == 0 and done["crashes"] == 0, done
        assert "reading the dataset" in service.workers[-1].log.read_text()  # it did meet the blip
    finally:
        proxy.close()


def test_a_cancel_and_a_delete_that_redis_lost_in_a_restart_still_hold(faults):
    """Redis restarts from an append-only file without its last writes (as with ``appendfsync
    everysec``): a cancel and a delete the API had answered for. Redis keeps those jobs, stale, as
    queued with their task messages; their saved records say otherwise, and they never train."""
    service = faults
    with service.client() as client:
        kept, cancelled, deleted = (
            client.post("/train", json={"dataset_id": service.dataset_id, **JOB, "epochs": 1}).json() for _ in "abc"
        )
        before = service.redis.folder.parent / "aof-before-the-last-writes"
        aof = [path for path in service.redis.folder.iterdir() if path.name.startswith("appendonly")]
        for path in aof:
            copy = shutil.copytree if path.is_dir() else shutil.copy2
            copy(path, before / path.name)
        assert client.post(f"/jobs/{cancelled['id']}/cancel").json()["status"] == "cancelled"
        assert client.post(f"/jobs/{deleted['id']}/cancel").json()["status"] == "cancelled"
        assert client.delete(f"/jobs/{deleted['id']}").status_code == 204

        time.sleep(2)  # Redis tells its uptime in whole seconds: the jobs must be older than that
        service.redis.process.stop(signal.SIGKILL)
        for path in aof:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            shutil.move(before / path.name, path)
        service.redis = start_redis(
            service.redis.folder, service.log_dir, "--appendonly", "yes", "--appendfsync", "always",
            port=service.redis.port,
        )  # fmt: skip
        stale = [service.store.get_job(job["id"]).status for job in (cancelled, deleted)]
        assert stale == ["queued", "queued"]  # what Redis lost

        service.start_worker("after-restart")
        assert wait_for_job(client, kept["id"], ("succeeded", "failed", "cancelled"))["status"] == "succeeded"
        wait_until(lambda: client.get(f"/jobs/{deleted['id']}").status_code == 404, 30, "the deleted job gone")
        assert client.get(f"/jobs/{cancelled['id']}").json()["status"] == "cancelled"
        time.sleep(2)
    logs = service.worker_logs()
    assert logs.count(f"job {kept['id']}: training on") == 1, logs[-3000:]
    assert f"job {cancelled['id']}: training on" not in logs and f"job {deleted['id']}: training on" not in logs
    assert not service.run_dir(deleted["id"]).exists()
