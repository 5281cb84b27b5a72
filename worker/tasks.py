"""Celery tasks. Each is a thin shell: take the id, call the logic in ``worker.training``."""

from __future__ import annotations

from worker.celery_app import app, node_name, settings, store
from worker.queue import TRAIN_TASK
from worker.training import run_job


@app.task(name=TRAIN_TASK, ignore_result=True)
def train(job_id: str) -> str:
    """Train job ``job_id`` if it is still queued and its lease is free; returns what happened."""
    return run_job(job_id, store(), settings, node_name())
