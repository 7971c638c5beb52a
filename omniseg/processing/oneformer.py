"""OneFormer processor: images and a task to model inputs, outputs to segments.

The reference splits this between ``OneFormerImageProcessor`` (images, post-processing) and
``OneFormerProcessor`` (adds the tokenized task text); here one object does both, with the
checkpoint's tokenizer files read by :class:`~omniseg.processing.task_tokenizer.TaskTokenizer`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from omniseg.errors import CheckpointError
from omniseg.hub import resolve_model_dir
from omniseg.io.atomic import atomic_write_text
from omniseg.models.checkpoint import saving_into
from omniseg.models.config import read_json
from omniseg.processing import mask_classification
from omniseg.processing.base import PROCESSOR_NAME
from omniseg.processing.maskformer import MaskFormerImageProcessor
from omniseg.processing.outputs import BatchFeature
from omniseg.processing.task_tokenizer import TaskTokenizer
from omniseg.processing.transforms import ImageLike

TASKS = ("semantic", "instance", "panoptic")
# Where the reference's OneFormerProcessor keeps its own settings (task_seq_length).
PROCESSOR_CONFIG_NAME = "processor_config.json"
DEFAULT_TASK_SEQ_LENGTH = 77


def task_text(task: str) -> str:
    """The text OneFormer is conditioned on; raises ``ValueError`` for an unknown task."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    return f"the task is {task}"


def _model_task_seq_len(directory: Path) -> int:
    """The length of the task inputs for a directory with no ``processor_config.json`` (the
    hub checkpoints' layout): the model's own ``task_seq_len``. The reference processor takes
    77 there, right for every published checkpoint, but a model configured otherwise then
    fails on the processor's inputs."""
    try:
        length = read_json(directory / "config.json").get("task_seq_len", DEFAULT_TASK_SEQ_LENGTH)
    except CheckpointError:  # no model config beside the processor: the reference's default
        return DEFAULT_TASK_SEQ_LENGTH
    return length if isinstance(length, int) and not isinstance(length, bool) else DEFAULT_TASK_SEQ_LENGTH


@dataclasses.dataclass
class OneFormerImageProcessor(MaskFormerImageProcessor):
    """Prepares images and task inputs for OneFormer and turns its outputs into segmentations.

    Images are prepared as by Mask2Former's processor without rounding sizes up to a multiple
    of 32 (the reference's OneFormer processor has no ``size_divisor``); semantic and panoptic
    post-processing are MaskFormer's (masks at the model's own resolution), except that
    panoptic maps are resized to the targets with antialiased bilinear (the reference uses
    torchvision there); instance post-processing is OneFormer's own (see
    :meth:`post_process_instance_segmentation`).

    ``tokenizer`` (read from the model directory by :meth:`from_pretrained`) turns the task
    into ``task_inputs``; ``task_seq_length`` is their length (the reference processor's,
    from ``processor_config.json``; 77 by default).
    """

    processor_type = "OneFormerImageProcessor"
    size_divisor: ClassVar[int] = 0
    # The reference's OneFormer resizes panoptic maps with torchvision, which antialiases.
    panoptic_antialias: ClassVar[bool] = True
    # The pipeline passes the task to the processor.
    takes_task_inputs: ClassVar[bool] = True

    repo_path: str | None = "shi-labs/oneformer_demo"
    class_info_file: str | None = None
    num_text: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # Not settings of preprocessor_config.json: set by from_pretrained.
        self.tokenizer: TaskTokenizer | None = None
        self.task_seq_length = DEFAULT_TASK_SEQ_LENGTH
        self.model_directory: Path | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "OneFormerImageProcessor":
        """Settings from ``preprocessor_config.json`` (else the ``image_processor`` entry of
        ``processor_config.json``, where recent references save them), the task tokenizer
        from the tokenizer files beside it, ``task_seq_length`` from ``processor_config.json``
        if there is one."""
        directory = resolve_model_dir(name_or_path)
        combined = read_json(directory / PROCESSOR_CONFIG_NAME) if (directory / PROCESSOR_CONFIG_NAME).is_file() else {}
        if (directory / PROCESSOR_NAME).is_file() or not isinstance(combined.get("image_processor"), dict):
            processor = cls.from_settings_file(directory / PROCESSOR_NAME)
        else:
            processor = cls.from_settings_file(directory / PROCESSOR_CONFIG_NAME, "image_processor")
        processor.tokenizer = TaskTokenizer.from_directory(directory)
        processor.model_directory = directory
        try:
            processor.task_seq_length = int(combined.get("task_seq_length", _model_task_seq_len(directory)))
        except (TypeError, ValueError):
            raise CheckpointError(directory / PROCESSOR_CONFIG_NAME, "task_seq_length is not an integer") from None
        return processor

    def save_pretrained(self, directory: str | Path) -> None:
        """``preprocessor_config.json``, ``processor_config.json`` and the tokenizer's files."""
        super().save_pretrained(directory)
        with saving_into(directory) as directory:
            settings = {"processor_class": "OneFormerProcessor", "task_seq_length": self.task_seq_length}
            atomic_write_text(directory / PROCESSOR_CONFIG_NAME, json.dumps(settings, indent=2, sort_keys=True) + "\n")
            if self.tokenizer is not None:
                self.tokenizer.save(directory)

    # ------------------------------------------------------------------ preprocessing

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        task_inputs: str | Sequence[str] | None = None,
        *,
        return_tensors: str | None = "pt",
        task_padding: str = "zeros",
        task_seq_length: int | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        """Model inputs for a batch of images and their tasks.

        Args:
            images: one image or a list (as for :class:`Mask2FormerImageProcessor`).
            task_inputs: ``"semantic"``, ``"instance"`` or ``"panoptic"``, one for all images
                or one per image; default ``"panoptic"``.
            task_padding: ``"zeros"``: padding positions hold 0, as the reference's
                ``OneFormerProcessor`` gives them (ids times attention mask); ``"pad_token"``:
                the tokenizer's pad id, as the reference's image-segmentation pipeline
                tokenizes them. Either way a text longer than ``task_seq_length`` is cut to it
                (end token kept): the reference's pipeline leaves it longer, and the model
                fails on it (a config whose ``task_seq_len`` is shorter than the task text).
            task_seq_length: length of ``task_inputs`` (default ``self.task_seq_length``).
            **overrides: any other setting of this processor for this call.

        Returns:
            :class:`BatchFeature` with ``pixel_values [B, 3, H, W]``, ``pixel_mask [B, H, W]``
            and ``task_inputs [B, task_seq_length]`` (int64 token ids).
        """
        if self.tokenizer is None:
            raise CheckpointError(
                "OneFormerImageProcessor",
                "no task tokenizer: load the processor with from_pretrained(model directory)",
            )
        if task_padding not in ("zeros", "pad_token"):
            raise ValueError(f"task_padding must be 'zeros' or 'pad_token', got {task_padding!r}")
        encoded = super().__call__(images, return_tensors=return_tensors, **overrides)
        count = len(encoded["pixel_values"])
        tasks = [task_inputs or "panoptic"] * count if isinstance(task_inputs, (str, type(None))) else list(task_inputs)
        if len(tasks) != count:
            raise ValueError(f"got {count} images but {len(tasks)} task inputs")
        length = self.task_seq_length if task_seq_length is None else task_seq_length
        zeros = task_padding == "zeros"
        ids, mask = self.tokenizer([task_text(task) for task in tasks], length=length, truncate=True)
        task_ids = ids * mask if zeros else ids
        encoded["task_inputs"] = task_ids if return_tensors == "pt" else (
            task_ids.numpy() if return_tensors == "np" else list(task_ids)
        )
        return encoded

    preprocess = __call__

    # ------------------------------------------------------------------ post-processing

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        task_type: str = "instance",
        is_demo: bool = True,
        threshold: float = 0.5,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None,
        return_coco_annotation: bool = False,
    ) -> list[dict[str, Any]]:
        """Instances as OneFormer's reference finds them.

        The top ``Q`` (query, class) pairs by class probability (kept above ``threshold``
        when ``is_demo``; only thing classes for ``task_type="panoptic"``) compete for the
        pixels as panoptic segments do, but on the *logits* of their masks times their
        score, never fused: segment ids 1, 2, ... in top-k order, 0 where no segment.

        Returns:
            One dict per image: ``segmentation`` (int32 ``[H, W]``, or float32 filled with
            -1 when no pair is kept; COCO RLE with ``return_coco_annotation``) and
            ``segments_info`` (``{"id", "label_id", "was_fused", "score"}``).
        """
        thing_ids = self.thing_ids() if task_type == "panoptic" else None
        # The reference renumbers ADE20k's thing classes outside demo mode.
        relabel = (
            self.thing_ids()
            if not is_demo and "instance" in task_type and "ade20k" in (self.class_info_file or "")
            else None
        )
        return mask_classification.post_process_topk_segments(
            outputs,
            threshold=threshold if is_demo else None,
            mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            target_sizes=target_sizes,
            allowed_labels=thing_ids,
            relabel=relabel,
            return_coco_annotation=return_coco_annotation,
        )

    def thing_ids(self) -> list[int]:
        """The "thing" class ids of the checkpoint's class-info file (``class_info_file``,
        looked up in ``repo_path``, the model directory, then the hub dataset ``repo_path``)."""
        if not self.class_info_file:
            raise CheckpointError(
                "preprocessor_config.json", "no class_info_file: the thing classes are unknown"
            )
        info = read_json(self._class_info_path())
        try:
            return [int(key) for key, entry in info.items() if entry["isthing"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(self.class_info_file, f"not a class-info file ({exc})") from exc

    def _class_info_path(self) -> Path:
        name = str(self.class_info_file)
        candidates = [Path(self.repo_path or "") / name]
        if self.model_directory is not None:
            candidates.append(self.model_directory / name)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        if not self.repo_path:
            raise CheckpointError(name, "class-info file not found")
        import huggingface_hub

        try:
            return Path(huggingface_hub.hf_hub_download(self.repo_path, name, repo_type="dataset"))
        except Exception as exc:  # offline, missing repository or file: all say why
            raise CheckpointError(f"{self.repo_path}/{name}", f"class-info file not found ({exc})") from exc
