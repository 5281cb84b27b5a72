"""Celery tasks. Each is a thin shell: take the id, call the logic in ``worker.job_runner``."""

from __future__ import annotations

from core.dispatch import TRAIN_TASK
from worker.celery_app import SHUTDOWN, app, node_name, send_again, settings, store
from worker.job_runner import run_job


@app.task(name=TRAIN_TASK, ignore_result=True, bind=True)
def train(self, job_id: str) -> str:
    """Train job ``job_id`` if it is queued and its lease is free; returns what happened."""
    return run_job(
        job_id, store(), settings, node_name(), dispatch=send_again, shutdown=SHUTDOWN, task_id=self.request.id
    )
