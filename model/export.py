"""ONNX export of a trained SSD with decoding and NMS in the graph: images in, final detections out.

The graph is ``Detector.predict`` after its resize, as fixed-size tensors (ONNX outputs have
one shape per batch)::

    images  float32 [N, 3, S, S]  RGB in 0-1, already resized to the network's square input
    boxes   float32 [N, K, 4]     (x1, y1, x2, y2) relative to the input side (0-1)
    scores  float32 [N, K]        0 in an empty slot
    labels  int64   [N, K]        1-based class ids (``class_id`` of /detect), 0 in an empty slot

with the K best detections per image first, by descending score, and the class names as a
JSON list in the model's metadata (``metadata_props``, key ``classes``).

It is exported with torch's dynamo exporter (``torch.export``, the one torch's docs recommend)
and needs the ``onnx`` extra (``pip install "ssd-service[onnx]"``). NMS is a custom operator
(``ssd::grouped_nms``): ``model.nms.grouped_nms`` when PyTorch runs it, ONNX's
``NonMaxSuppression`` in the exported graph.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .boxes import decode
from .detector import Detector
from .network import SSD300
from .nms import grouped_nms
from .run_folder import commit_temp, write_temp

# The graph's version, in the metadata; bump it (and core.layout.ONNX_MODEL) when the graph changes.
GRAPH_VERSION = 1
# The ONNX opset of the graph: supported by the dynamo exporter of every torch the extra admits,
# and by ONNX Runtime since 1.14.
OPSET = 18
INPUT_NAMES = ["images"]
OUTPUT_NAMES = ["boxes", "scores", "labels"]
EXTRA_HINT = 'install the onnx extra: pip install "ssd-service[onnx]"'


class OnnxUnavailable(RuntimeError):
    """The packages the ONNX export needs are not installed."""


def require_onnx() -> None:
    """Raises :class:`OnnxUnavailable` naming what to install when the exporter's packages are missing."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OnnxUnavailable(f"ONNX export needs {' and '.join(missing)}, which are not installed: {EXTRA_HINT}")


@torch.library.custom_op("ssd::grouped_nms", mutates_args=())
def _grouped_nms_op(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``grouped_nms`` as one operator that ``torch.export`` keeps whole (see ``_grouped_nms_onnx``)."""
    return grouped_nms(boxes, valid, iou_threshold)


@_grouped_nms_op.register_fake
def _(boxes: torch.Tensor, valid: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    return torch.empty_like(valid)


def _grouped_nms_onnx(boxes, valid, iou_threshold: float):
    """``ssd::grouped_nms`` in ONNX: one ``NonMaxSuppression`` over every group, then its picks as a mask.

    Each group (image x class) is one NonMaxSuppression batch with a single class, so boxes
    are compared only within their group, without offsetting them apart (which would cost
    float precision). Like ``grouped_nms``, it ranks boxes by their slot, not their score:
    slot order is the score order, and ties between equal scores then break as in PyTorch.
    """
    from onnxscript import opset18

    # onnxscript's opset types give each op's result the union of every tensor type, which the next op's
    # parameters refuse: this graph is checked by running it (tests/model/test_onnx.py) instead.
    op: Any = opset18
    k = op.Shape(valid, start=1, end=2)  # [1]
    slots = op.Range(op.Constant(value_int=0), op.Squeeze(k), op.Constant(value_int=1))  # [k]
    rank = op.Cast(op.Sub(k, slots), to=1)  # float k .. 1, higher for better slots
    rank_scores = op.Where(valid, rank, op.Constant(value_float=0.0))  # [G, k]; invalid slots under the threshold
    selected = op.NonMaxSuppression(
        boxes,  # [G, k, 4]: IoU does not depend on the (x, y) versus (y, x) order ONNX names
        op.Unsqueeze(rank_scores, op.Constant(value_ints=[1])),  # [G, 1, k]: one class per group
        op.Cast(k, to=7),  # keep up to every box
        op.Constant(value_float=iou_threshold),
        op.Constant(value_float=0.5),
    )  # [M, 3] (group, class 0, slot) of each kept box
    group_slot = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # [M, 2]
    ones = op.Expand(op.Constant(value_int=1), op.Shape(selected, start=0, end=1))  # [M]
    zeros = op.Expand(op.Constant(value_int=0), op.Shape(valid))  # [G, k]
    return op.Cast(op.ScatterND(zeros, group_slot, ones), to=9)  # bool [G, k]


class ExportableSSD(nn.Module):
    """An SSD300 with decoding and NMS: pre-resized images in, K detections per image out.

    The same detections as :meth:`Detector.predict` on images already at the network's input
    size (``postprocess`` step by step), but in fixed shapes without data-dependent cuts, so that
    ``torch.export`` can trace it: every one of the top ``topk_candidates`` boxes per class
    enters NMS, those at or under ``score_threshold`` as invalid slots that neither survive nor
    suppress.

    Args:
        model: the network in eval mode; give it batch norms folded (as :class:`Detector`
            holds it) to compute the Detector's numbers.
        score_threshold, topk_candidates, nms_threshold: as ``postprocess``.
        max_detections: K, the detection slots per image.

    Forward:
        images: float Tensor[N, 3, S, S] RGB in 0-1, S = ``model.config.image_size``.

    Returns:
        boxes: float32 Tensor[N, K, 4] ``(x1, y1, x2, y2)`` relative to the input side (0-1).
        scores: float32 Tensor[N, K], descending; 0 in empty slots.
        labels: int64 Tensor[N, K], 1-based class ids; 0 in empty slots (which come last).
    """

    def __init__(
        self,
        model: SSD300,
        *,
        score_threshold: float = 0.01,
        topk_candidates: int = 200,
        nms_threshold: float = 0.45,
        max_detections: int = 100,
    ):
        super().__init__()
        if model.training:
            raise ValueError("ExportableSSD needs a model in eval mode")
        num_defaults = model.defaults.shape[0]
        self.model = model
        self.score_threshold = score_threshold
        self.topk_candidates = min(topk_candidates, num_defaults)
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.train(False)  # the wrapper has no layers of its own; the exporter asks for eval mode
        if self.topk_candidates * (model.num_classes - 1) < max_detections:
            raise ValueError(
                f"{max_detections} detection slots need at least as many candidates; "
                f"got {self.topk_candidates} per class for {model.num_classes - 1} classes"
            )

    @classmethod
    def from_detector(
        cls, detector: Detector, *, score_threshold: float = 0.01, max_detections: int = 100
    ) -> ExportableSSD:
        """The Detector's network (batch norms folded) and decoding settings, on its device."""
        return cls(
            detector.model,
            score_threshold=score_threshold,
            topk_candidates=detector.topk_candidates,
            nms_threshold=detector.nms_threshold,
            max_detections=max_detections,
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loc, logits = self.model(images)
        num_classes = logits.shape[-1]
        scores = torch.softmax(logits.float(), dim=-1)[..., 1:]  # [N, A, C-1], background dropped
        boxes = decode(loc.float(), self.model.defaults.float(), self.model.config.variances).clamp(0, 1)

        k = self.topk_candidates
        top_scores, top_index = scores.transpose(1, 2).topk(k, dim=2)  # [N, C-1, k], descending
        valid = top_scores > self.score_threshold
        cand_boxes = torch.gather(
            boxes[:, None].expand(-1, num_classes - 1, -1, -1), 2, top_index[..., None].expand(-1, -1, -1, 4)
        )  # [N, C-1, k, 4]
        keep = _grouped_nms_op(cand_boxes.flatten(0, 1), valid.flatten(0, 1), self.nms_threshold).view_as(valid)

        # The best K per image across classes; dropped slots (-1) sort after every kept one.
        kept_scores = torch.where(keep, top_scores, -1.0).flatten(1)  # [N, (C-1) * k]
        best_scores, best = kept_scores.topk(self.max_detections, dim=1)
        found = best_scores >= 0
        labels = torch.where(found, best // k + 1, 0)
        best_boxes = torch.gather(cand_boxes.flatten(1, 2), 1, best[..., None].expand(-1, -1, 4))
        return torch.where(found[..., None], best_boxes, 0.0), torch.where(found, best_scores, 0.0), labels


def export_program(module: ExportableSSD, classes: list[str]):
    """The ``torch.onnx.ONNXProgram`` of ``module`` with a dynamic batch and ``classes`` in its metadata.

    Raises:
        OnnxUnavailable: the onnx extra is not installed.
    """
    require_onnx()
    side = module.model.config.image_size
    # A batch of 2: torch.export would take a batch of 1 for a constant.
    example = torch.rand(2, 3, side, side, device=module.model.defaults.device)
    program = torch.onnx.export(
        module,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        custom_translation_table={torch.ops.ssd.grouped_nms.default: _grouped_nms_onnx},
        verbose=False,
    )
    if program is None:  # torch returns none only when it writes a file itself, which this call does not ask
        raise RuntimeError("torch.onnx.export gave no ONNX program")
    program.model.metadata_props["classes"] = json.dumps(classes)
    program.model.metadata_props["ssd_graph_version"] = str(GRAPH_VERSION)
    return program


def export_onnx(checkpoint: Path | str, out_path: Path | str) -> None:
    """Write the model of a checkpoint of ``fit`` as ONNX with decoding and NMS (see the module docstring).

    The Detector's decoding (its NMS IoU and candidates per class), a 0.01 score threshold and
    100 detections per image. ``out_path`` is replaced whole; its folder must exist.

    Raises:
        OnnxUnavailable: the onnx extra is not installed.
        CheckpointError: unreadable, truncated or foreign checkpoint.
        FileNotFoundError: ``out_path``'s folder does not exist.
    """
    require_onnx()
    detector = Detector.from_checkpoint(checkpoint, device="cpu", amp=False)  # the graph is float32
    proto = export_program(ExportableSSD.from_detector(detector), detector.classes).model_proto

    def write(file: IO[bytes]) -> None:
        file.write(proto.SerializeToString())

    out_path = Path(out_path)
    temp = write_temp(out_path, write, make_folder=False)
    try:
        commit_temp(temp, out_path)
    finally:
        temp.unlink(missing_ok=True)
