"""A trained SSD ready to serve: images of any size in, boxes in their own pixels out."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from .checkpoint import CheckpointError, read_checkpoint
from .config import ModelConfig
from .data.tensor_decode import decode_images
from .device import Precision, amp_dtype, autocast, memory_format, precision_name, resolve_device
from .fusion import fold_batch_norms
from .network import SSD300
from .postprocess import Detections, postprocess
from .pretrained import COCO_CLASSES, COCO_WEIGHTS, WeightsError, coco_model, read_state_dict

ImageInput = Image.Image | torch.Tensor
# Input pixels converted to float32 and resized at once (about 200 MB of float32 at full size).
_PIXELS_PER_RESIZE = 2**24


class Detector:
    """Runs one batched forward pass over a list of images and decodes the boxes.

    Args:
        model: a trained network (its ``config`` gives the input size and variances). The
            detector works on its own copy (``own_copy=False`` takes ``model`` itself), with
            batch norms folded into the convolutions.
        classes: class names; class id i (1-based) is ``classes[i - 1]``.
        device: where to run.
        amp: mixed precision where the device has it (``model.device``'s rule: bf16 or fp16 on CUDA,
            bf16 on a CPU that computes it natively), in channels_last; False runs float32.
        nms_threshold, topk_candidates: decoding settings (see ``postprocess``).
        compile: run the network through ``torch.compile`` (the same outputs, faster on a GPU).
            Each new batch size compiles again, for up to a minute (past torch's recompile limit,
            8 by default, it runs uncompiled): it suits fixed batch sizes (offline detection,
            benchmarks), not a server's varying ones.

    Attributes:
        autocast_dtype: the mixed-precision dtype of the forward pass (bf16 or fp16); None runs it in
            float32.
    """

    def __init__(
        self,
        model: SSD300,
        classes: list[str],
        device: torch.device | str = "cpu",
        *,
        nms_threshold: float = 0.45,
        topk_candidates: int = 200,
        own_copy: bool = True,
        compile: bool = False,
        amp: bool = True,
    ):
        if len(classes) + 1 != model.config.num_classes:
            raise ValueError(f"{len(classes)} class names for a model of {model.config.num_classes - 1} classes")
        self.device = torch.device(device)
        model = (copy.deepcopy(model) if own_copy else model).eval()
        fold_batch_norms(model)
        self.autocast_dtype = amp_dtype(self.device, enabled=amp)
        # Module.to takes memory_format (as Tensor.to does); torch's stubs leave it out of every overload.
        self.model = model.to(self.device, memory_format=self._layout)  # type: ignore[call-overload]
        self.classes = list(classes)
        self.nms_threshold = nms_threshold
        self.topk_candidates = topk_candidates
        self.network = torch.compile(self.model, dynamic=False) if compile else self.model

    @classmethod
    def from_checkpoint(cls, path: Path | str, device: str = "auto", **kwargs) -> Detector:
        """Rebuild the exact trained network from a checkpoint of ``fit``, or torchvision's COCO SSD300
        from its published file (``COCO_WEIGHTS.file_name``).

        Raises:
            CheckpointError: unreadable, truncated or foreign checkpoint.
        """
        model, classes = load_model(path)
        return cls(model, classes, resolve_device(device), own_copy=False, **kwargs)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def precision(self) -> Precision:
        return precision_name(self.autocast_dtype)

    @property
    def _layout(self) -> torch.memory_format:
        return memory_format(self.device, self.autocast_dtype)

    def _prepare(self, images: list[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize every image to the network's square input on the device.

        Images of the same size, dtype and device go to the device and through the resize
        together, so a batch of equal-sized images costs a few copies and resizes, not one per
        image; at most ``_PIXELS_PER_RESIZE`` input pixels at a time, so that large photos do
        not all sit in float32 at full size at once.

        Returns:
            batch: float Tensor[B, 3, S, S] in 0-1 (channels_last where the model is).
            sizes: Tensor[B, 2] original ``(width, height)``.
        """
        tensors = [_to_chw_tensor(image) for image in images]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, tensor in enumerate(tensors):
            key = (*tensor.shape, tensor.dtype, tensor.device)
            groups[key].append(i)
        order, resized = [], []
        for indices in groups.values():
            height, width = tensors[indices[0]].shape[-2:]
            per_resize = max(1, _PIXELS_PER_RESIZE // (height * width))
            for start in range(0, len(indices), per_resize):
                chunk = indices[start : start + per_resize]
                resized.append(self._resize(torch.stack([tensors[i] for i in chunk])))
                order += chunk
        batch = torch.cat(resized)
        if order != sorted(order):  # back to the callers' order
            batch = batch[torch.tensor(order, device=self.device).argsort()]
        sizes = torch.tensor([(t.shape[-1], t.shape[-2]) for t in tensors], device=self.device)
        return batch.contiguous(memory_format=self._layout), sizes

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """Tensor[N, 3, H, W] (uint8 0-255 or float 0-1) -> float Tensor[N, 3, S, S] 0-1 on the device."""
        images = images.to(self.device, non_blocking=True)  # uint8 travels at a quarter of float's size
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        side = self.image_size
        return images if images.shape[-2:] == (side, side) else F.resize(images, [side, side], antialias=True)

    @torch.inference_mode()
    def predict(
        self, images: list[ImageInput], score_threshold: float = 0.5, max_detections: int = 100
    ) -> list[Detections]:
        """Tensor detections per image: boxes ``(x1, y1, x2, y2)`` in that image's pixels."""
        if not images:
            return []
        batch, sizes = self._prepare(images)
        with autocast(self.device, self.autocast_dtype):
            loc, logits = self.network(batch)
        return postprocess(
            loc,
            logits,
            self.model.defaults,
            sizes,
            variances=self.model.config.variances,
            score_threshold=score_threshold,
            topk_candidates=self.topk_candidates,
            nms_threshold=self.nms_threshold,
            max_detections=max_detections,
        )

    def detect(
        self, images: list[ImageInput], score_threshold: float = 0.5, max_detections: int = 100
    ) -> list[list[dict]]:
        """Detections per image as JSON-ready dicts, sorted by descending score.

        Args:
            images: PIL images (any mode) or Tensor[3, H, W] (uint8 0-255 or float 0-1), any sizes.

        Returns:
            Per image: ``[{"box": [x1, y1, x2, y2], "label": str, "class_id": int, "score": float}]``
            with boxes in the image's own pixels.
        """
        results = []
        for found in self.predict(images, score_threshold, max_detections):
            boxes, scores, labels = found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist()
            results.append(
                [
                    {"box": [round(v, 2) for v in box], "label": self.classes[c - 1], "class_id": c, "score": s}
                    for box, s, c in zip(boxes, scores, labels, strict=True)
                ]
            )
        return results

    def detect_encoded(
        self,
        data: Sequence[bytes],
        score_threshold: float = 0.5,
        max_detections: int = 100,
        max_pixels: int | None = None,
    ) -> list[list[dict]]:
        """``detect`` on encoded images (JPEG, PNG, WebP... bytes), decoded on the detector's device:
        JPEGs in one batch (nvJPEG on CUDA), with the project's decoding rule (``decode_images``).

        Raises:
            ImageDecodeError (``ImageTooLarge`` over ``max_pixels``): naming an image that could
                not be decoded (see ``decode_images``); no image of the batch is detected on.
        """
        images: list[ImageInput] = list(decode_images(data, self.device, max_pixels))
        return self.detect(images, score_threshold, max_detections)


def load_model(path: Path | str) -> tuple[SSD300, list[str]]:
    """The trained network (on the CPU, eval mode) and class names saved in a checkpoint of ``fit``, or
    torchvision's COCO SSD300 and its 80 category names from its published file.

    Raises:
        CheckpointError: unreadable, truncated or foreign checkpoint (or COCO weights file).
    """
    if Path(path).name == COCO_WEIGHTS.file_name:
        try:
            state = read_state_dict(Path(path))  # its errors name the file
        except WeightsError as error:
            raise CheckpointError(str(error)) from None
        try:
            return coco_model(state), list(COCO_CLASSES)
        except WeightsError as error:
            raise CheckpointError(f"{path}: {error}") from None
    checkpoint = read_checkpoint(Path(path))
    try:
        model = SSD300(ModelConfig.from_dict(checkpoint.model_config))
        model.load_state_dict(checkpoint.model)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} does not describe a loadable SSD: {error}") from None
    return model.eval(), checkpoint.classes


def _to_chw_tensor(image: ImageInput) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(image.convert("RGB"))
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an RGB image tensor [3, H, W], got shape {tuple(image.shape)}")
    return image
