"""Batch inference on Ray Data (the ``ray`` extra): ``segment_dataset`` maps a
``ray.data.Dataset`` of images to one of segments; ``omniseg segment --engine ray`` runs the
command line's job on a Ray cluster (a local instance by default)."""

from omniseg.distributed.dataset import SEGMENT_COLUMNS, segment_dataset

__all__ = ["SEGMENT_COLUMNS", "segment_dataset"]
