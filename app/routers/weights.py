"""GET /weights: the pretrained weights this server has, and what each training ``init`` would start from."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import SettingsDep
from app.schemas import WeightsInfo
from core.weights import WeightsFolder, what_inits_use
from model.pretrained import COCO_WEIGHTS

router = APIRouter(tags=["operations"])


@router.get("/weights", response_model=WeightsInfo)
def list_weights(settings: SettingsDep) -> dict:
    """The weights folder's files (torchvision's published names), whether downloads are on, what each
    ``init`` of POST /train would use, and whether ``POST /detect?model=coco`` can answer."""
    folder = WeightsFolder.from_settings(settings)
    return {
        "folder": str(folder.folder),
        "download": settings.weights_download,
        "files": folder.listing(),
        "inits": what_inits_use(folder),
        "coco_model": folder.path(COCO_WEIGHTS).is_file(),
    }
