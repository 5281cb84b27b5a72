"""Settings: read from SSD_* variables, unsafe values refused."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_settings_come_from_ssd_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("SSD_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("SSD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SSD_DETECT_BATCH_SIZE", "16")
    monkeypatch.setenv("SSD_DEVICE", "cpu")
    settings = Settings()
    assert settings.redis_url == "redis://example:6380/2" and settings.detect_batch_size == 16
    assert settings.runs_dir == tmp_path / "runs" and settings.datasets_dir == tmp_path / "datasets"


def test_detect_batching_defaults_suit_the_device():
    default = Settings(_env_file=None)
    assert (default.detect_batch_size_for(on_gpu=False), default.pending_detections(on_gpu=False)) == (8, 32)
    assert (default.detect_batch_size_for(on_gpu=True), default.pending_detections(on_gpu=True)) == (64, 128)
    chosen = Settings(_env_file=None, detect_batch_size=16)
    assert chosen.detect_batch_size_for(on_gpu=True) == 16 and chosen.pending_detections(on_gpu=True) == 64
    assert Settings(_env_file=None, max_pending_detections=5).pending_detections(on_gpu=False) == 5
    assert (default.detect_image_threads(on_gpu=False), default.detect_image_threads(on_gpu=True)) == (2, 8)
    assert Settings(_env_file=None, image_threads=3).detect_image_threads(on_gpu=True) == 3


RENAMED = [
    ("SSD_BATCH_MAX_SIZE", "SSD_DETECT_BATCH_SIZE", "detect_batch_size", "7"),
    ("SSD_BATCH_MAX_WAIT_MS", "SSD_DETECT_BATCH_WAIT_MS", "detect_batch_wait_ms", "7"),
    ("SSD_MAX_BATCH_IMAGES", "SSD_MAX_IMAGES_PER_REQUEST", "max_images_per_request", "7"),
    ("SSD_MAX_BATCH_BYTES", "SSD_MAX_BATCH_REQUEST_BYTES", "max_batch_request_bytes", "4096"),
]


@pytest.mark.parametrize(("old", "new", "field", "value"), RENAMED)
def test_a_renamed_variable_is_read_under_its_old_name_with_a_warning(monkeypatch, old, new, field, value):
    monkeypatch.delenv(new, raising=False)
    monkeypatch.setenv(old, value)
    with pytest.warns(FutureWarning, match=f"{old} is renamed {new}"):
        settings = Settings(_env_file=None)
    assert getattr(settings, field) == float(value)


def test_the_new_name_of_a_renamed_variable_wins_over_its_old_one(monkeypatch):
    monkeypatch.setenv("SSD_BATCH_MAX_SIZE", "7")
    monkeypatch.setenv("SSD_DETECT_BATCH_SIZE", "9")
    with pytest.warns(FutureWarning, match="SSD_BATCH_MAX_SIZE is ignored"):
        assert Settings(_env_file=None).detect_batch_size == 9


def test_the_new_names_alone_warn_of_nothing(monkeypatch):
    for old, new, _, value in RENAMED:
        monkeypatch.delenv(old, raising=False)
        monkeypatch.setenv(new, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert Settings(_env_file=None).max_images_per_request == 7


@pytest.mark.parametrize(
    "values",
    [
        {"redis_url": "http://localhost:6379"},
        {"storage_url": "http://bucket"},
        {"storage_url": "s3://"},
        {"cache_bytes": -1},
        {"device": "tpu"},
        {"detect_batch_size": 0},
        {"max_upload_bytes": -1},
        {"port": 70000},
        {"lease_seconds": 4, "worker_heartbeat_seconds": 5},
        {"lease_seconds": 6, "worker_heartbeat_seconds": 1, "cancel_check_seconds": 2.5},  # renewals come too late
        {"max_job_restarts": -1},
        {"max_event_streams": 0},
        {"key_prefix": "a b"},
    ],
)
def test_unsafe_settings_are_refused(values):
    with pytest.raises(ValidationError):
        Settings(**values)


@pytest.mark.process  # starts the API's and a worker's process (each stops at start-up)
@pytest.mark.parametrize("command", [["-m", "app"], ["-m", "celery", "-A", "worker.celery_app", "worker"]])
def test_a_setting_that_lets_a_lease_lapse_stops_the_process_at_start_up(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSD_")}
    env.update(SSD_LEASE_SECONDS="20", SSD_CANCEL_CHECK_SECONDS="8", SSD_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "cancel_check_seconds must be at most a third of lease_seconds" in done.stderr


def test_settings_table_lists_every_variable():
    from core.settings import settings_table

    table = settings_table()
    for name in Settings.model_fields:
        assert f"`SSD_{name.upper()}`" in table


def test_the_api_keeps_its_cores_and_a_worker_on_the_same_host_takes_the_rest_while_it_detects(monkeypatch):
    from core.cpu_threads import api_threads, host_cores, shared_host_api_cores, worker_threads_beside_api

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert host_cores() == 8
    alone = Settings(_env_file=None)
    assert (api_threads(alone), worker_threads_beside_api(alone)) == (8, 8)  # a process alone on its host
    shared = Settings(_env_file=None, api_cpu_cores=shared_host_api_cores())
    assert (api_threads(shared), worker_threads_beside_api(shared)) == (4, 4)
    assert worker_threads_beside_api(Settings(_env_file=None, api_cpu_cores=8)) == 1  # at least one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert shared_host_api_cores() == 1


def test_half_the_cores_is_what_a_shared_host_is_given(monkeypatch):
    from core.cpu_threads import api_threads, worker_threads_beside_api

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setenv("SSD_API_CPU_CORES", "half")  # as docker-compose.yml passes it to both containers
    shared = Settings(_env_file=None)
    assert shared.api_cpu_cores == 4
    assert (api_threads(shared), worker_threads_beside_api(shared)) == (4, 4)
    monkeypatch.setenv("SSD_API_CPU_CORES", "")  # as Compose passes an unset one
    assert Settings(_env_file=None).api_cpu_cores is None
    monkeypatch.setenv("SSD_API_CPU_CORES", "most")
    with pytest.raises(ValidationError, match="api_cpu_cores"):
        Settings(_env_file=None)
