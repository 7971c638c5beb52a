"""A streaming confusion matrix for semantic segmentation, built with one ``bincount`` per update.

The matrix is what every semantic metric (IoU, accuracy, Dice, frequency-weighted IoU) is
computed from, so a dataset never has to sit in memory: feed label maps as they come, and
sum the matrices of several workers (``merge`` or ``all_reduce``) in a distributed run.

Reference-label preprocessing follows the ``mean_iou`` metric of the ``evaluate`` library,
which the seeds fine-tune with, exactly:

* ``label_map`` (``{old: new}``) is applied to the references, every lookup on the
  *original* labels;
* ``reduce_labels`` then turns reference label 0 into 255 and lowers every other label by
  one (255 stays 255), as for datasets whose 0 is "background, not a class" (ADE20k);
* pixels whose (processed) reference equals ``ignore_index`` are dropped.

Predictions are never remapped. A value outside ``[0, num_labels)`` on either side is kept
in an extra "out of range" row/column: an out-of-range prediction on a valid pixel still
costs the reference class a false negative, and a valid prediction on an out-of-range
reference pixel still costs the predicted class a false positive, which is what
``evaluate``'s histogram-based computation does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch

# What one update accepts: a single (H, W) map, a batch (B, H, W), or a list of maps.
LabelMaps = Union[torch.Tensor, np.ndarray, Sequence[Any], Any]


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    """Turn one label map (tensor, numpy array, PIL image, nested list) into an integer tensor."""
    if isinstance(value, torch.Tensor):
        tensor = value
    else:
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"{what}: cannot read a label map from {type(value).__name__}")
        if array.dtype == np.uint16 or array.dtype == np.uint32 or array.dtype == np.uint64:
            # torch has no arithmetic on wide unsigned types; int64 holds every label value.
            array = array.astype(np.int64)
        if not array.flags.writeable:
            # A view of a PIL image or a read-only buffer: torch wants memory it may write.
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8)
    if tensor.is_floating_point() or tensor.is_complex():
        # Float maps happen (an image decoded to float, a label map divided by 1.0); they are
        # fine when every value is a whole number, and a mistake (logits, probabilities) otherwise.
        if tensor.is_complex() or not torch.equal(tensor, torch.round(tensor)):
            raise TypeError(
                f"{what}: expected integer class ids, got non-integer {tensor.dtype} values "
                "(take the argmax over the class dimension first)"
            )
        return tensor.to(torch.int64)
    return tensor


def _split_maps(value: LabelMaps, what: str) -> list[torch.Tensor]:
    """One update's input as a list of tensors of shape (H, W) or (B, H, W)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        tensor = _as_tensor(value, what)
        if tensor.dim() not in (2, 3):
            raise ValueError(f"{what}: expected a (H, W) map or a (B, H, W) batch, got shape {tuple(tensor.shape)}")
        # A batch is counted image by image: the working arrays of one image stay in cache,
        # which is faster than one pass over the whole batch.
        return [tensor] if tensor.dim() == 2 else list(tensor.unbind(0))
    if isinstance(value, (list, tuple)):
        if len(value) and all(isinstance(v, (int, np.integer)) for v in value):
            raise ValueError(f"{what}: expected label maps, got a flat list of numbers")
        tensors: list[torch.Tensor] = []
        for i, item in enumerate(value):
            tensor = _as_tensor(item, f"{what}[{i}]")
            if tensor.dim() != 2:
                raise ValueError(f"{what}[{i}]: expected a (H, W) map, got shape {tuple(tensor.shape)}")
            tensors.append(tensor)
        return tensors
    # A PIL image or anything numpy can read as one map.
    return _split_maps(_as_tensor(value, what), what)


class ConfusionMatrix:
    """Streaming ``num_labels x num_labels`` confusion matrix (rows: reference, columns: prediction).

    Args:
        num_labels: number of classes; class ids are ``0 .. num_labels - 1``.
        ignore_index: reference value whose pixels are left out (after ``label_map`` and
            ``reduce_labels``); ``None`` leaves nothing out.
        reduce_labels: reference 0 becomes ignored (255) and every other label is lowered by one.
        label_map: ``{old_id: new_id}`` applied to references before ``reduce_labels``.
        device: where the counts live; by default the device of the first update.

    Example::

        cm = ConfusionMatrix(num_labels=11, ignore_index=11)
        for pred, ref in batches:
            cm.update(pred, ref)
        matrix = cm.compute()          # (11, 11) int64 tensor
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int | None = 255,
        reduce_labels: bool = False,
        label_map: Mapping[int, int] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if int(num_labels) < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        self.num_labels = int(num_labels)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.reduce_labels = bool(reduce_labels)
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self._device = None if device is None else torch.device(device)
        # One extra row and column (index num_labels) collects out-of-range values.
        self._counts = torch.zeros((self.num_labels + 1, self.num_labels + 1), dtype=torch.int64, device=self._device)

    # ----------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget everything seen so far."""
        self._counts.zero_()

    @property
    def extended(self) -> torch.Tensor:
        """The counts including the out-of-range row and column, shape ``(n + 1, n + 1)``."""
        return self._counts

    def compute(self) -> torch.Tensor:
        """The ``(num_labels, num_labels)`` int64 matrix on the CPU; ``[r, p]`` counts pixels of
        reference class ``r`` predicted as ``p``."""
        return self._counts[: self.num_labels, : self.num_labels].cpu().clone()

    def areas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-class ``(intersection, predicted area, reference area)`` as float64 arrays.

        The areas include pixels whose other side is out of range (see the module docstring),
        so they equal the histograms of ``evaluate``'s ``mean_iou``.
        """
        counts = self._counts.cpu().to(torch.float64).numpy()
        n = self.num_labels
        intersection = np.diag(counts)[:n].copy()
        predicted = counts[:, :n].sum(axis=0)
        reference = counts[:n, :].sum(axis=1)
        return intersection, predicted, reference

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add ``other``'s counts into this matrix (in place) and return ``self``."""
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"can only merge another ConfusionMatrix, got {type(other).__name__}")
        if (other.num_labels, other.ignore_index, other.reduce_labels, other.label_map) != (
            self.num_labels,
            self.ignore_index,
            self.reduce_labels,
            self.label_map,
        ):
            raise ValueError("cannot merge confusion matrices built with different settings")
        self._counts += other._counts.to(self._counts.device)
        return self

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        return self.merge(other)

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        result = self.copy()
        return result.merge(other)

    def copy(self) -> "ConfusionMatrix":
        """An independent copy with the same settings and counts."""
        result = ConfusionMatrix(self.num_labels, self.ignore_index, self.reduce_labels, self.label_map, self._device)
        result._counts = self._counts.clone()
        return result

    def all_reduce(self, group: Any = None) -> "ConfusionMatrix":
        """Sum the counts over every process of a ``torch.distributed`` group (in place).

        Does nothing when ``torch.distributed`` is not initialised, so the same code runs
        single-process. Every process must call it (it is a collective).
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._counts, op=dist.ReduceOp.SUM, group=group)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Settings and counts, plain data, for checkpoints."""
        return {
            "num_labels": self.num_labels,
            "ignore_index": self.ignore_index,
            "reduce_labels": self.reduce_labels,
            "label_map": dict(self.label_map),
            "counts": self._counts.cpu().tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "ConfusionMatrix":
        """Rebuild a matrix saved with :meth:`state_dict`."""
        result = cls(state["num_labels"], state["ignore_index"], state["reduce_labels"], state["label_map"])
        result._counts = torch.tensor(state["counts"], dtype=torch.int64)
        return result

    # ----------------------------------------------------------------------------- update
    def update(self, predictions: LabelMaps, references: LabelMaps) -> None:
        """Count one map, a batch ``(B, H, W)``, or a list of maps (sizes may differ between maps).

        Args:
            predictions: predicted class ids (torch, numpy, PIL or nested lists).
            references: reference class ids, same shape(s) as ``predictions``.
        """
        preds = _split_maps(predictions, "predictions")
        refs = _split_maps(references, "references")
        if len(preds) != len(refs):
            raise ValueError(f"got {len(preds)} prediction maps but {len(refs)} reference maps")
        for i, (pred, ref) in enumerate(zip(preds, refs)):
            if pred.shape != ref.shape:
                raise ValueError(
                    f"prediction {i} has shape {tuple(pred.shape)} but its reference has shape {tuple(ref.shape)}"
                )
            self._update_one(pred, ref)

    def _prepare_references(self, ref: torch.Tensor) -> torch.Tensor:
        """Apply ``label_map`` then ``reduce_labels`` exactly as ``evaluate``'s mean_iou does."""
        if self.label_map:
            original = ref
            ref = ref.clone()
            for old, new in self.label_map.items():
                ref[original == old] = new
        if self.reduce_labels:
            ref = torch.where(ref == 0, torch.full_like(ref, 255), ref) - 1
            ref = torch.where(ref == 254, torch.full_like(ref, 255), ref)
        return ref

    def _reference_codes(self, ref: np.ndarray) -> np.ndarray:
        """Elementwise: raw reference value -> flat-index offset ``row * (n + 1)``, or ``DROP``.

        Used on the whole map for wide integer types and on ``arange`` of the value range
        (a lookup table) for narrow ones; both give the same result.
        """
        n = self.num_labels
        side = n + 1
        ref = ref.astype(np.int64)
        if self.label_map:
            original = ref
            ref = ref.copy()
            for old, new in self.label_map.items():
                ref[original == old] = new
        if self.reduce_labels:
            ref = np.where(ref == 0, 255, ref) - 1
            ref = np.where(ref == 254, 255, ref)
        codes = np.where((ref >= 0) & (ref < n), ref, n) * side
        if self.ignore_index is not None:
            codes = np.where(ref == self.ignore_index, side * side + side, codes)
        return codes

    def _prediction_codes(self, pred: np.ndarray) -> np.ndarray:
        """Elementwise: raw predicted value -> column index (out-of-range values -> ``n``)."""
        n = self.num_labels
        pred = pred.astype(np.int64, copy=False)
        return np.where((pred >= 0) & (pred < n), pred, n)

    def _encode(self, values: np.ndarray, encoder: Any, is_prediction: bool = False) -> np.ndarray:
        """Encode a flat integer array elementwise with ``encoder``, through a lookup table.

        A table over the value range plus one gather is several times cheaper than running
        the encoder's comparisons and ``where``s over every pixel.
        """
        if values.dtype == np.bool_:
            values = values.view(np.uint8)
        if values.dtype.itemsize <= 2:
            # Narrow types: a table over every representable value, addressed through the
            # unsigned view so that signed values need no offset arithmetic.
            unsigned = np.dtype(f"u{values.dtype.itemsize}")
            raw = np.arange(np.iinfo(unsigned).max + 1, dtype=np.int64).astype(unsigned)
            table = encoder(raw.view(values.dtype).astype(np.int64))
            return table[values.view(unsigned)]
        low, high = int(values.min()), int(values.max())
        if is_prediction and low >= 0 and high < self.num_labels:
            # The usual case (an argmax): nothing to fold.
            return values.astype(np.int64, copy=False)
        if high - low <= (1 << 20):
            table = encoder(np.arange(low, high + 1, dtype=np.int64))
            return np.take(table, values - low if low else values, mode="clip")
        return encoder(values)

    def _update_one(self, pred: torch.Tensor, ref: torch.Tensor) -> None:
        if pred.numel() == 0:
            return
        if pred.device.type == "cpu" and ref.device.type == "cpu" and self._counts.device.type == "cpu":
            self._update_numpy(pred.detach().reshape(-1).numpy(), ref.detach().reshape(-1).numpy())
        else:
            self._update_torch(pred, ref)

    def _update_numpy(self, pred: np.ndarray, ref: np.ndarray) -> None:
        # numpy's gather + bincount is several times faster than torch's on CPU for this job.
        n = self.num_labels
        side = n + 1
        ref_codes = self._encode(ref, self._reference_codes)
        pred_codes = self._encode(pred, self._prediction_codes, is_prediction=True)
        counts = np.bincount(ref_codes + pred_codes, minlength=side * side + side)[: side * side]
        self._counts += torch.from_numpy(counts.reshape(side, side))

    def _update_torch(self, pred: torch.Tensor, ref: torch.Tensor) -> None:
        if self._counts.device != pred.device and self._device is None and not bool(self._counts.any()):
            # Follow the data to its device (a CUDA evaluation loop) while still empty.
            self._counts = self._counts.to(pred.device)
        device = self._counts.device
        n = self.num_labels
        side = n + 1
        pred = pred.reshape(-1).to(device=device, dtype=torch.int64)
        ref = ref.reshape(-1).to(device=device, dtype=torch.int64)
        if self.label_map or self.reduce_labels:
            ref = self._prepare_references(ref)
        # Pixels to leave out, decided on the processed reference before any folding.
        ignored = ref == self.ignore_index if self.ignore_index is not None else None
        # Fold out-of-range values into the extra bin n.
        outside = torch.full((), n, dtype=torch.int64, device=device)
        pred = torch.where((pred >= 0) & (pred < n), pred, outside)
        ref = torch.where((ref >= 0) & (ref < n), ref, outside)
        index = ref * side + pred
        if ignored is not None:
            # Send ignored pixels past the end of the matrix instead of compacting the arrays
            # with a boolean mask (one pass instead of two, no reallocation).
            index = torch.where(ignored, torch.full((), side * side, dtype=torch.int64, device=device), index)
        counts = torch.bincount(index, minlength=side * side + 1)[: side * side]
        self._counts += counts.reshape(side, side)
