"""The API and a CPU worker of one host share its cores (core.cpu_threads), through a real redis-server:
the API's forward passes mark it as detecting, and the worker's thread count follows before each batch."""

from __future__ import annotations

import pytest
import torch

from core import cpu_threads
from core.cpu_threads import CoreSharing, DetectingSignal
from core.settings import Settings
from model.config import TrainConfig
from model.training import Callbacks
from tests.support.processes import wait_until
from worker.job_runner import sharing_cores_with_the_api


@pytest.fixture
def quick(monkeypatch):
    """Short signal and polling times, so a test sees a detection come and go within a second."""
    monkeypatch.setattr(cpu_threads, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(cpu_threads, "DETECTING_TTL_MS", 300)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_workers_seen_say_where_each_trains(fresh):
    fresh.worker_heartbeat("cpu-worker", "cpu")
    fresh.worker_heartbeat("gpu-worker", "cuda")
    fresh.worker_heartbeat("quiet-worker")  # one that does not say
    seen = {w["name"]: w["device"] for w in fresh.workers_seen(60)}
    assert seen == {"cpu-worker": "cpu", "gpu-worker": "cuda", "quiet-worker": None}
    fresh.worker_gone("cpu-worker")
    assert [w["name"] for w in fresh.workers_seen(60)] == ["quiet-worker", "gpu-worker"]
    assert fresh.redis.keys(f"{fresh.prefix}:worker-device:cpu-worker") == []


def test_a_worker_leaves_the_api_its_cores_while_it_detects_and_takes_them_back_after(fresh, quick):
    signal = DetectingSignal(fresh.mark_api_detecting)
    sharing = CoreSharing(fresh.api_detecting, alone=2, beside_api=1)
    signal.start()
    sharing.start()
    try:
        sharing.apply()
        assert torch.get_num_threads() == 2  # the API idle: every core

        signal.detected()  # a forward pass: the signal thread marks it in Redis, the worker's thread reads it

        def shared() -> bool:
            signal.detected()  # more requests keep coming
            sharing.apply()
            return torch.get_num_threads() == 1

        wait_until(shared, 5, "the worker to leave the API its core")
        assert fresh.api_detecting()

        def alone() -> bool:  # no more forward passes: the mark expires, the worker takes its cores back
            sharing.apply()
            return torch.get_num_threads() == 2

        wait_until(alone, 5, "the worker to take its cores back")
        assert not fresh.api_detecting()
    finally:
        signal.stop()
        sharing.stop()


def test_a_cpu_run_shares_only_when_an_api_shares_its_host(fresh, quick, tmp_path):
    stops: list[bool] = []
    callbacks = Callbacks(should_stop=lambda: stops.append(True) or False)
    cpu = TrainConfig(device="cpu")
    alone = Settings(_env_file=None, data_dir=tmp_path)
    with sharing_cores_with_the_api(cpu, alone, fresh, callbacks) as given:
        assert given is callbacks  # SSD_API_CPU_CORES unset: no API shares this host

    shared = Settings(_env_file=None, data_dir=tmp_path, api_cpu_cores=1)
    fresh.mark_api_detecting(10_000)
    with sharing_cores_with_the_api(cpu, shared, fresh, callbacks) as given:
        assert given is not callbacks and given.on_epoch is callbacks.on_epoch

        def yields() -> bool:
            assert given.should_stop() is False  # the run's own check still decides
            return torch.get_num_threads() == max(1, cpu_threads.host_cores() - 1)

        wait_until(yields, 5, "the run to leave the API its core")
        assert stops
    assert torch.get_num_threads() == cpu_threads.host_cores()  # the run over: every core again
