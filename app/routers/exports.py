"""GET /jobs/{id}/model.onnx: a succeeded job's model as ONNX, with decoding and NMS in the graph."""

from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from app.deps import JobId, SettingsDep, StoreDep, job_or_404
from app.inference import CheckpointMissing
from app.model_choice import checkpoint_name, open_checkpoint
from core.layout import ONNX_MODEL
from core.records import SUCCEEDED
from core.settings import Settings
from core.store import Store
from model.checkpoint import CheckpointError
from model.export import OnnxUnavailable, export_onnx, require_onnx

router = APIRouter(tags=["jobs"])

# One export at a time in this process: an export holds the model and its traced graph in memory
# (about a gigabyte at full width), and a second request for the same job then finds the file
# the first one wrote instead of exporting again.
_exporting = threading.Lock()


def onnx_file(store: Store, settings: Settings, job_id: str, held: ExitStack) -> Path:
    """The job's ONNX file, exported on its first request; kept (with a bucket, in the cache) until
    ``held`` closes.

    A succeeded job's checkpoint never changes, so the export is written once (atomically, so
    that a reader never sees half of it) and stays until the job is deleted with its files.

    Raises:
        HTTPException: 404 unknown (or just deleted) job, 409 not succeeded, 501 without the
            onnx extra, 500 unreadable checkpoint.
    """
    job = job_or_404(store, job_id)
    if job.status != SUCCEEDED or not job.checkpoint:
        raise HTTPException(409, f"job {job_id} is {job.status}: only a succeeded job's model can be exported")
    try:
        require_onnx()
    except OnnxUnavailable as error:
        raise HTTPException(501, f"this server cannot export ONNX models: {error}") from error
    try:
        checkpoint = held.enter_context(open_checkpoint(settings.storage, job_id, checkpoint_name(job)))
    except CheckpointMissing as error:
        raise HTTPException(409, str(error)) from error
    with _exporting:
        try:
            # Never creates the run folder: a deleted job stays deleted. With a bucket, the export is
            # cached on this machine beside the checkpoint version it was made from.
            return held.enter_context(settings.storage.derived_file(job_id, ONNX_MODEL, checkpoint, export_onnx))
        except FileNotFoundError as error:
            raise HTTPException(404, f"job {job_id} was deleted while its model was exported") from error
        except CheckpointError as error:
            raise HTTPException(500, f"job {job_id}'s checkpoint cannot be loaded: {error}") from error


@router.get(
    "/jobs/{job_id}/model.onnx",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The ONNX model."},
        404: {"description": "No such job."},
        409: {"description": "The job has not succeeded."},
        501: {"description": 'The server lacks the onnx extra (pip install "ssd-service[onnx]").'},
    },
)
async def get_onnx_model(job_id: JobId, store: StoreDep, settings: SettingsDep) -> FileResponse:
    """A succeeded job's model as ONNX, with decoding and NMS in the graph.

    Input ``images``: float32 [N, 3, S, S], RGB in 0-1, resized to the model's square input
    (S = 300). Outputs ``boxes`` float32 [N, 100, 4] (x1, y1, x2, y2 relative to the input),
    ``scores`` float32 [N, 100] and ``labels`` int64 [N, 100] (the ``class_id`` of /detect,
    0 = empty slot), best first, after a 0.01 score threshold and NMS. The class names are a
    JSON list in the metadata key ``classes``. The first request exports (a few seconds).
    """
    held = ExitStack()  # the file stays until it is sent
    try:
        path = await run_in_threadpool(onnx_file, store, settings, job_id, held)
    except BaseException:
        held.close()
        raise
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"{job_id}.onnx", background=BackgroundTask(held.close)
    )
