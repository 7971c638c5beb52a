"""The ``image-segmentation`` pipeline: images in, a list of {score, label, mask} per image out.

Behaviour follows the reference pipeline: each image is processed at its own size (so an
image's answer never depends on what else is in the batch; on the CPU each image also runs
its own forward pass, see :meth:`ImageSegmentationPipeline._batches`), ``subtask=None`` resolves to
panoptic, then instance, then semantic by what the model supports, semantic results have
``score: None``, and masks are mode "L" PIL images (0 or 255) at the input image's size.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from omniseg.io.images import DEFAULT_MAX_PIXELS, load_image
from omniseg.models.auto import load_model, load_processor
from omniseg.ops.bfloat16 import convolutions_to_bfloat16
from omniseg.ops.linear import as_plain_linear
from omniseg.pipelines._options import check_integer, check_number

SUBTASKS = ("panoptic", "instance", "semantic")
_POSTPROCESSORS = {
    "panoptic": "post_process_panoptic_segmentation",
    "instance": "post_process_instance_segmentation",
    "semantic": "post_process_semantic_segmentation",
}

ImageInput = Any  # path, URL, PIL image or HxWxC uint8 array


@dataclass
class Segmentation:
    """One image's answer before it is turned into PIL masks.

    Attributes:
        subtask: the subtask that produced it.
        label_map: ``[H, W]`` int64 tensor at the image's size. For panoptic and instance
            results, the segment id of each pixel (``0`` for none); for semantic results,
            the class id of each pixel.
        segments: per segment ``{"id", "label_id", "score"}`` (score ``None`` for semantic).
    """

    subtask: str
    label_map: torch.Tensor
    segments: list[dict[str, Any]]


class ImageSegmentationPipeline:
    """Semantic, instance and panoptic segmentation with one model and its image processor."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        processor: Any,
        device: str | torch.device = "cpu",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        batch_size: int = 1,
        quantize: str | None = None,
    ) -> None:
        """
        Args:
            quantize: ``"int8"``: opt-in fast CPU mode, int8 dynamic quantization of the
                linear layers (answers change slightly; see the README's Speed section).
                ``None`` (default): float32, the reference implementation's answers.
        """
        # Checked here, not at the first call: batch_size=0 used to be kept (and mean 1 on
        # the CPU), max_pixels=0 refused every image as too large.
        check_integer("batch_size", batch_size, 1)
        if max_pixels is not None:
            check_integer("max_pixels", max_pixels, 1, " (or None for no limit)")
        self.device = torch.device(device)
        if quantize is not None:
            _check_quantize(quantize, self.device)  # before the model moves to a device
        model = model.to(self.device).eval()
        if quantize is not None:
            model = quantize_linear_layers(model, quantize, self.device)
        self.model = model
        self.processor = processor
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self._model_inputs = set(inspect.signature(model.forward).parameters)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, device: str | torch.device = "cpu", **kwargs: Any
    ) -> "ImageSegmentationPipeline":
        if kwargs.get("quantize") is not None:
            _check_quantize(kwargs["quantize"], torch.device(device))  # before loading the weights there
        return cls(
            model=load_model(name_or_path, device=device),
            processor=load_processor(name_or_path),
            device=device,
            **kwargs,
        )

    @property
    def id2label(self) -> dict[int, str]:
        """The name of every class the model can predict. A config whose ``id2label`` has
        gaps (ids 1-10 and 42 for an 11-class head) leaves some outputs unnamed: they are
        ``LABEL_<id>``, the hub's name for unnamed classes (the reference raises KeyError)."""
        config = self.model.config
        names = config.id2label
        if len(names) == config.num_labels and all(i in names for i in range(config.num_labels)):
            return names
        return {i: names.get(i, f"LABEL_{i}") for i in range(config.num_labels)} | names

    def supported_subtasks(self) -> list[str]:
        return [task for task in SUBTASKS if hasattr(self.processor, _POSTPROCESSORS[task])]

    def resolve_subtask(self, subtask: str | None) -> str:
        """The subtask that ``subtask`` means for this model (``None``: the first supported)."""
        supported = self.supported_subtasks()
        if subtask is None:
            return supported[0]
        if subtask not in SUBTASKS:
            raise ValueError(f"unknown subtask {subtask!r}; choose one of {', '.join(SUBTASKS)}")
        if subtask not in supported:
            raise ValueError(
                f"subtask {subtask!r} is not supported by {type(self.model).__name__} "
                f"(supported: {', '.join(supported)})"
            )
        return subtask

    def __call__(
        self,
        inputs: ImageInput | Sequence[ImageInput],
        *,
        subtask: str | None = None,
        threshold: float = 0.9,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.5,
        batch_size: int | None = None,
        tta: bool = False,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Segment one image (returns a list of segments) or a list of images (a list of lists).

        Args:
            inputs: a local path, an http(s) URL, a PIL image, an ``HxWxC`` uint8 array, or a
                list of them.
            subtask: ``"panoptic"``, ``"instance"``, ``"semantic"`` or ``None`` (resolved by
                what the model supports, in that order).
            threshold: minimum class probability of a kept segment (instance, panoptic).
            mask_threshold: mask probability above which a pixel belongs to a mask.
            overlap_mask_area_threshold: minimum fraction of a query's mask that must remain
                after overlaps are resolved for the segment to be kept.
            batch_size: images of equal processed size per forward pass on an accelerator
                (default: the pipeline's ``batch_size``); the CPU runs one image per pass.
            tta: test-time flip, semantic only: the class scores of the image and of its
                mirror image are averaged before the argmax (two forward passes per image).

        Raises:
            ValueError: an option out of its range (thresholds outside [0, 1], a subtask the
                model does not support), checked before any image is read.
            InputError: an image that cannot be read, naming it (see :func:`load_image`).
        """
        # Options first: a wrong value must not cost reading every image before it is found.
        _check_options(threshold, mask_threshold, overlap_mask_area_threshold, batch_size)
        self.resolve_subtask(subtask)
        single = not isinstance(inputs, (list, tuple))
        images = [inputs] if single else list(inputs)
        segmentations = self.predict(
            [load_image(image, max_pixels=self.max_pixels) for image in images],
            subtask=subtask,
            threshold=threshold,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            batch_size=batch_size,
            tta=tta,
        )
        results = [self.to_annotations(segmentation) for segmentation in segmentations]
        return results[0] if single else results

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[Image.Image],
        *,
        subtask: str | None = None,
        threshold: float = 0.9,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.5,
        batch_size: int | None = None,
        tta: bool = False,
    ) -> list[Segmentation]:
        """Segment RGB PIL images; the answer per image as a label map and segment records
        (``tta``: see :meth:`__call__`)."""
        _check_options(threshold, mask_threshold, overlap_mask_area_threshold, batch_size)
        subtask = self.resolve_subtask(subtask)
        batch_size = batch_size or self.batch_size
        if tta:
            return self._semantic_with_flip(images, subtask, batch_size)
        results: list[Segmentation | None] = [None] * len(images)
        for indices, inputs in self._batches(images, batch_size, subtask):
            outputs = self.model(**inputs)
            target_sizes = [(images[i].height, images[i].width) for i in indices]
            postprocess = getattr(self.processor, _POSTPROCESSORS[subtask])
            if subtask == "semantic":
                maps = postprocess(outputs, target_sizes=target_sizes)
                for i, label_map in zip(indices, maps):
                    results[i] = _semantic_segmentation(label_map)
            else:
                answers = postprocess(
                    outputs,
                    threshold=threshold,
                    mask_threshold=mask_threshold,
                    overlap_mask_area_threshold=overlap_mask_area_threshold,
                    target_sizes=target_sizes,
                )
                for i, answer in zip(indices, answers):
                    results[i] = Segmentation(
                        subtask=subtask,
                        label_map=answer["segmentation"].cpu(),
                        segments=[
                            {"id": s["id"], "label_id": s["label_id"], "score": s["score"]}
                            for s in answer["segments_info"]
                        ],
                    )
        return results  # type: ignore[return-value]

    def to_annotations(self, segmentation: Segmentation) -> list[dict[str, Any]]:
        """The pipeline's public form: ``[{"score", "label", "mask"}]`` with PIL "L" masks."""
        label_map = segmentation.label_map.numpy()
        key = "label_id" if segmentation.subtask == "semantic" else "id"
        ids = np.array([segment[key] for segment in segmentation.segments], dtype=label_map.dtype)
        # All masks in one comparison; the bool result viewed as uint8 and scaled in place
        # gives 0/255 without another full-size copy per segment.
        masks = (label_map[None] == ids.reshape(-1, 1, 1)).view(np.uint8)
        masks *= 255
        id2label = self.id2label
        return [
            {
                "score": segment["score"],
                "label": id2label[segment["label_id"]],
                "mask": Image.fromarray(mask, mode="L"),
            }
            for segment, mask in zip(segmentation.segments, masks)
        ]

    def check_tta(self, subtask: str) -> None:
        """Raise ValueError unless test-time flip (``tta=True``) applies to ``subtask`` with
        this model: semantic only, for models whose processor gives class scores."""
        if subtask != "semantic":
            raise ValueError(f"tta (test-time flip) averages semantic class scores: use subtask 'semantic', not {subtask!r}")
        if not hasattr(self.processor, "semantic_scores"):
            raise ValueError(f"tta (test-time flip) is not offered for {type(self.model).__name__} models")

    def _semantic_with_flip(self, images: Sequence[Image.Image], subtask: str, batch_size: int) -> list[Segmentation]:
        """Semantic maps from the class scores of each image and its mirror image, averaged
        (test-time flip); ``batch_size`` images (and their mirrors) at a time."""
        self.check_tta(subtask)
        scorer = self.processor.semantic_scores
        results: list[Segmentation] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            views = list(chunk) + [ImageOps.mirror(image) for image in chunk]
            sums: list[torch.Tensor | None] = [None] * len(chunk)
            for indices, inputs in self._batches(views, batch_size, subtask):
                target_sizes = [(views[i].height, views[i].width) for i in indices]
                for i, scores in zip(indices, scorer(self.model(**inputs), target_sizes=target_sizes)):
                    if i >= len(chunk):
                        i -= len(chunk)
                        scores = scores.flip(-1)
                    sums[i] = scores if sums[i] is None else sums[i] + scores
            results.extend(_semantic_segmentation(total.argmax(dim=0)) for total in sums)
        return results

    def _batches(self, images: Sequence[Image.Image], batch_size: int, subtask: str):
        """Yield ``(indices, model inputs)``, batching only images of equal processed shape.

        Each image is preprocessed alone, as the reference does, so padding inside a batch
        never changes an image's answer; images whose inputs have the same shape are then
        stacked, up to ``batch_size`` at a time, on accelerators. On the CPU every image is
        its own batch: there, batching gains at most ~5% throughput (batches of 4; batches of
        8 are slower), and batched kernels split and sum their work in other orders than one
        image's (oneDNN's blocking, multi-threaded products, int8's per-batch activation
        scales), so a batched image's logits would move by float rounding with its company.
        """
        if self.device.type == "cpu":
            batch_size = 1
        task_kwargs = {}
        if getattr(self.processor, "takes_task_inputs", False):
            # OneFormer: the task text as the reference pipeline tokenizes it (pad-token
            # padding to the model's task_seq_len, not the processor's zero padding).
            task_kwargs = {
                "task_inputs": subtask,
                "task_padding": "pad_token",
                "task_seq_length": self.model.config.task_seq_len,
            }
        pending: dict[tuple[int, ...], list[tuple[int, dict[str, torch.Tensor]]]] = {}
        for index, image in enumerate(images):
            encoded = self.processor(images=[image], return_tensors="pt", **task_kwargs)
            inputs = {k: v for k, v in encoded.items() if k in self._model_inputs}
            shape = tuple(inputs["pixel_values"].shape)
            group = pending.setdefault(shape, [])
            group.append((index, inputs))
            if len(group) == batch_size:
                yield self._stack(pending.pop(shape))
        for group in pending.values():
            yield self._stack(group)

    def _stack(self, group: list[tuple[int, dict[str, torch.Tensor]]]):
        indices = [index for index, _ in group]
        names = group[0][1].keys()
        inputs = {
            name: torch.cat([item[name] for _, item in group]).to(self.device) for name in names
        }
        return indices, inputs


def _check_options(
    threshold: Any, mask_threshold: Any, overlap_mask_area_threshold: Any, batch_size: Any
) -> None:
    """Raise ValueError naming the option unless each is in its range.

    The three thresholds are probabilities or fractions, so [0, 1]; out of range they used to
    be taken as given (``threshold=1.5`` answered no segments, ``-0.1`` every query's), NaN
    silently gave no segments, and a str reached torch as "'>' not supported between
    instances of 'Tensor' and 'str'".
    """
    for name, value in (
        ("threshold", threshold),
        ("mask_threshold", mask_threshold),
        ("overlap_mask_area_threshold", overlap_mask_area_threshold),
    ):
        check_number(name, value, low=0.0, high=1.0)
    if batch_size is not None:
        check_integer("batch_size", batch_size, 1, " (or None)")


def quantize_linear_layers(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """The fast CPU mode: ``torch.ao.quantization.quantize_dynamic`` with int8 weights on the
    model's linear layers (activations quantized on the fly per batch), which CPUs with
    VNNI run about twice as fast as float32 matmuls.

    Left in float32: the prediction heads (class and mask embedding, cheap and closest to
    the answer) and everything that is not an ``nn.Linear`` (convolutions, the decoder's
    packed cross-attention projections, attention itself). Swin's query/key/value
    projections are first stacked into one layer so they are quantized as one matmul.
    On CPUs with native bfloat16 products the large 3x3 convolutions run in bfloat16
    (:mod:`omniseg.ops.bfloat16`), the largest float32 products left.

    The int8 kernels are those of the quantization engine the weights are packed for:
    oneDNN's on CPUs with AMX (its int8 tile products run the large projections 2-2.4x
    faster than the default x86 engine's fbgemm on an Intel Xeon with AMX), the default
    engine elsewhere. A packed layer keeps its engine's kernels whatever the global engine
    is later, so the engine is switched only while packing.
    """
    _check_quantize(mode, device)
    from torch.ao.quantization import quantize_dynamic

    replaced: set[str] = set()
    for name, module in model.named_modules():
        if hasattr(module, "stack_qkv"):
            module.stack_qkv()
            replaced.update(f"{name}.{part}" for part in ("query", "key", "value"))
    heads = ("class_predictor", "class_embed", "mask_predictor", "decode_head.classifier")
    targets = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name not in replaced
        and not any(head in name for head in heads)
    }
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not a dependency here);
        # it still works, and the user asked for it: keep the output quiet.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*", category=UserWarning)
        # quantize_dynamic swaps only modules of the exact class nn.Linear.
        with _quantized_engine(int8_engine()):
            model = quantize_dynamic(as_plain_linear(model), qconfig_spec=targets, dtype=torch.qint8)
    convolutions_to_bfloat16(model)
    return model


def _check_quantize(mode: Any, device: torch.device) -> None:
    if mode != "int8":
        raise ValueError(f"unknown quantize mode {mode!r}; supported: 'int8'")
    if device.type != "cpu":
        raise ValueError(f"quantize='int8' runs on CPU only, not on {device}")


def int8_engine() -> str:
    """The quantization engine whose int8 kernels are fastest here (see quantize_linear_layers)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if amx and "onednn" in torch.backends.quantized.supported_engines:
        return "onednn"
    return torch.backends.quantized.engine


@contextlib.contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _semantic_segmentation(label_map: torch.Tensor) -> Segmentation:
    label_map = label_map.cpu()
    return Segmentation(
        subtask="semantic",
        label_map=label_map,
        segments=[
            {"id": int(label), "label_id": int(label), "score": None}
            for label in torch.unique(label_map).tolist()
        ],
    )
