"""Detection datasets: COCO, VOC and YOLO readers and writers, synthetic shapes, transforms, the torch Dataset.

Boxes everywhere are absolute pixel ``[x1, y1, x2, y2]``; class ids are 1-based (0 is background).
"""

from model.data.annotations import AnnotatedImage, DatasetError, DetectionData
from model.data.coco import read_coco, write_coco
from model.data.dataset import DetectionDataset, SeededSampler, collate_detections, split_train_val
from model.data.reader import read_dataset
from model.data.synthetic import make_shapes_dataset
from model.data.transforms import eval_transforms, train_transforms
from model.data.voc import read_voc, write_voc
from model.data.yolo import read_yolo, write_yolo

__all__ = [
    "AnnotatedImage",
    "DatasetError",
    "DetectionData",
    "DetectionDataset",
    "SeededSampler",
    "collate_detections",
    "eval_transforms",
    "make_shapes_dataset",
    "read_coco",
    "read_dataset",
    "read_voc",
    "read_yolo",
    "split_train_val",
    "train_transforms",
    "write_coco",
    "write_voc",
    "write_yolo",
]
