"""Settings: read from SSD_* variables, unsafe values refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.settings import Settings


def test_settings_come_from_ssd_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("SSD_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("SSD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SSD_BATCH_MAX_SIZE", "16")
    monkeypatch.setenv("SSD_DEVICE", "cpu")
    settings = Settings()
    assert settings.redis_url == "redis://example:6380/2" and settings.batch_max_size == 16
    assert settings.runs_dir == tmp_path / "runs" and settings.datasets_dir == tmp_path / "datasets"


@pytest.mark.parametrize(
    "values",
    [
        {"redis_url": "http://localhost:6379"},
        {"device": "tpu"},
        {"batch_max_size": 0},
        {"max_upload_bytes": -1},
        {"port": 70000},
        {"lease_seconds": 4, "worker_heartbeat_seconds": 5},
        {"key_prefix": "a b"},
    ],
)
def test_unsafe_settings_are_refused(values):
    with pytest.raises(ValidationError):
        Settings(**values)


def test_settings_table_lists_every_variable():
    from worker.settings import settings_table

    table = settings_table()
    for name in Settings.model_fields:
        assert f"`SSD_{name.upper()}`" in table
