"""/datasets: upload a COCO, VOC or YOLO zip, generate a synthetic one, list, get, delete."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile

from app.deps import DatasetId, ImportsDep, SettingsDep, StoreDep, dataset_or_404
from app.paging import Cursor, Limit, link_next, read_page
from app.schemas import UNREADABLE_BODY, Dataset, Responses, SyntheticDatasetRequest, invalid_body
from app.uploads import ImportPermit, ImportSlots
from core.dataset_import import DatasetImportError, create_synthetic, import_archive
from core.records import DatasetRecord
from core.storage import StorageUnavailable

router = APIRouter(prefix="/datasets", tags=["datasets"])

_BUSY: Responses = {
    503: {"description": "Every import slot is busy (SSD_IMPORT_SLOTS), or Redis or the storage is unreachable."}
}
_ERRORS: Responses = {
    400: {"description": "Not a zip, or a dataset with problems: the message names the file and the problem."},
    413: {"description": "The upload, its entry count, its compression ratio or its unpacked size is over the limit."},
    **_BUSY,
}


def _permit(request: Request) -> ImportPermit:
    """The import slot ``app.uploads.ImportAdmission`` reserved for this request."""
    return request.state.import_permit


async def _import(imports: ImportSlots, permit: ImportPermit, function, *args) -> Dataset:
    """Run an import (which stores the dataset, its record last) on the import pool.

    Shielded: a client that goes away mid-import does not stop it half-way.
    """
    try:
        record: DatasetRecord = await asyncio.shield(asyncio.ensure_future(imports.run(permit, function, *args)))
        return record.public()
    except DatasetImportError as error:
        raise HTTPException(413 if error.too_large else 400, str(error)) from error
    except StorageUnavailable as error:
        raise HTTPException(503, str(error)) from error


@router.post("", status_code=201, response_model=Dataset, responses=_ERRORS)
async def upload_dataset(
    request: Request,
    file: Annotated[
        UploadFile,
        File(
            description="A .zip holding COCO (JSON + images), Pascal VOC (Annotations/ + JPEGImages/) "
            "or YOLO (data.yaml + images/ + labels/)."
        ),
    ],
    store: StoreDep,
    settings: SettingsDep,
    imports: ImportsDep,
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> Dataset:
    """Import a zip of a COCO, Pascal VOC or YOLO detection dataset (recognised from its layout).

    The answer's ``warnings`` list what was accepted but deserves a look (for example an
    image used as stored because its annotation's size ignores its EXIF orientation).
    """
    filename = file.filename or "upload.zip"
    if file.size is not None and file.size > settings.max_upload_bytes:
        raise HTTPException(413, f"{filename}: {file.size} bytes; the limit is {settings.max_upload_bytes} bytes")
    args = (import_archive, file.file, filename, name, settings, store)
    return await _import(imports, _permit(request), *args)


@router.post("/synthetic", status_code=201, response_model=Dataset, responses={**_BUSY, **UNREADABLE_BODY})
async def create_synthetic_dataset(
    request: Request, body: SyntheticDatasetRequest, store: StoreDep, settings: SettingsDep, imports: ImportsDep
) -> Dataset:
    """Generate a dataset of coloured shapes (circle, square, triangle), for demos and tests."""
    if body.num_images > settings.max_synthetic_images:
        limit = f"num_images must be at most {settings.max_synthetic_images} (SSD_MAX_SYNTHETIC_IMAGES)"
        raise invalid_body("num_images", limit, body.num_images)
    args = (create_synthetic, body.num_images, body.seed, body.size_range(), body.name, settings, store)
    return await _import(imports, _permit(request), *args)


@router.get("", response_model=list[Dataset])
def list_datasets(
    request: Request, response: Response, store: StoreDep, limit: Limit = 100, cursor: Cursor = None
) -> list[Dataset]:
    """Datasets, newest first, ``limit`` at a time; the next page is named in the ``Link`` header."""
    page = read_page(lambda: store.list_datasets(limit, cursor))
    link_next(request, response, page)
    return [dataset.public() for dataset in page.items]


@router.get("/{dataset_id}", response_model=Dataset, responses={404: {"description": "No such dataset."}})
def get_dataset(dataset_id: DatasetId, store: StoreDep) -> Dataset:
    return dataset_or_404(store, dataset_id).public()


@router.delete(
    "/{dataset_id}",
    status_code=204,
    responses={
        404: {"description": "No such dataset."},
        409: {"description": "A queued or running job uses it."},
        503: {"description": "The storage (a bucket) could not delete the files; try again."},
    },
)
def delete_dataset(dataset_id: DatasetId, store: StoreDep, settings: SettingsDep) -> Response:
    outcome, job_id = store.delete_dataset(dataset_id)
    if outcome == "missing":
        raise HTTPException(404, f"no dataset with id {dataset_id!r}")
    if outcome == "busy":
        raise HTTPException(409, f"dataset {dataset_id} is used by job {job_id}, which has not ended; cancel it first")
    try:
        settings.storage.remove_dataset(dataset_id)
    except OSError as error:  # the record is gone; files left in a bucket come back at a rebuild, to delete again
        raise HTTPException(503, f"dataset {dataset_id}'s record is deleted but not all its files: {error}") from error
    return Response(status_code=204)
