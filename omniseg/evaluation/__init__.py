"""Metrics: semantic (IoU, accuracy, Dice), panoptic quality, COCO mask AP.

Everything streams (``update`` / ``compute`` / ``reset``), so a dataset never has to sit in
memory, and gives the figures of the established reference implementations.
"""

from omniseg.evaluation.confusion import ConfusionMatrix
from omniseg.evaluation.instance import InstanceSegmentationMetric, evaluate_coco_masks, masks_to_coco_results
from omniseg.evaluation.panoptic import PanopticQuality, pq_compute
from omniseg.evaluation.semantic import SemanticSegmentationMetric, mean_iou, metrics_from_confusion

__all__ = [
    "ConfusionMatrix",
    "InstanceSegmentationMetric",
    "PanopticQuality",
    "SemanticSegmentationMetric",
    "evaluate_coco_masks",
    "masks_to_coco_results",
    "mean_iou",
    "metrics_from_confusion",
    "pq_compute",
]
