"""The ``mask-generation`` pipeline: Segment Anything's "segment everything".

For each crop of the image (the image itself, plus ``crops_n_layers`` layers of tiles), the
image encoder runs once; a grid of point prompts is decoded in batches of
``points_per_batch``; masks pass when their predicted IoU exceeds ``pred_iou_thresh``,
their stability score exceeds ``stability_score_thresh`` and (in tiles) they do not touch
an inner tile edge; non-maximum suppression over the masks' boxes removes duplicates.
Parameters and outputs are the reference pipeline's; the answers are the same.

Where the reference upsamples every decoded mask to image size before filtering, this
pipeline first reads the IoU predictions (they do not depend on the mask head), runs the
mask head and the upsampling only for masks that pass, and keeps the image tokens shared
by all prompts until the decoder's first layer makes them differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omniseg.errors import UnsupportedModelError
from omniseg.io.images import DEFAULT_MAX_PIXELS, load_image
from omniseg.models.auto import load_model, load_processor, model_type_of
from omniseg.pipelines._options import check_integer, check_number
from omniseg.hub import resolve_model_dir
from omniseg.processing import mask_generation as amg
from omniseg.processing.sam import resized_shape

SAM_MODEL_TYPES = ("sam",)
# Kept masks upsampled to their crop's size at a time (a multiple of 3; see _upsample).
UPSAMPLE_CHUNK = 12


class MaskGenerationPipeline:
    """Every mask in an image, with a SAM model and its image processor."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        processor: Any,
        device: str | torch.device = "cpu",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if max_pixels is not None:  # 0 used to refuse every image as "exceeds the limit of 0"
            check_integer("max_pixels", max_pixels, 1, " (or None for no limit)")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, device: str | torch.device = "cpu", **kwargs: Any
    ) -> "MaskGenerationPipeline":
        directory = resolve_model_dir(name_or_path)
        model_type = model_type_of(directory)
        if model_type not in SAM_MODEL_TYPES:
            raise UnsupportedModelError(
                directory / "config.json",
                f"model_type {model_type!r} is not a mask-generation model (Segment Anything, "
                f"model_type 'sam'); use pipeline('image-segmentation', ...) for it",
            )
        return cls(model=load_model(directory, device=device), processor=load_processor(directory), device=device, **kwargs)

    def __call__(
        self,
        image: Any | Sequence[Any],
        *,
        points_per_batch: int | None = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1,
        mask_threshold: float = 0.0,
        crops_nms_thresh: float = 0.7,
        crops_n_layers: int = 0,
        crop_overlap_ratio: float = 512 / 1500,
        points_per_crop: int = 32,
        crop_n_points_downscale_factor: int = 1,
        output_rle_mask: bool = False,
        output_bboxes_mask: bool = False,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """All masks of one image (a dict) or of each image of a list (a list of dicts).

        Args:
            image: a local path, an http(s) URL, a PIL image, an ``HxWxC`` uint8 array, or a
                list of them.
            points_per_batch: point prompts decoded at once (memory vs. speed; ``None``:
                all of a crop's points at once). Answers do not depend on it.
            pred_iou_thresh: keep masks whose predicted IoU exceeds it (0 disables).
            stability_score_thresh: keep masks whose stability score exceeds it (0 disables).
            stability_score_offset: logit offset of the stability score's two binarisations.
            mask_threshold: logit above which a pixel is in the mask.
            crops_nms_thresh: box IoU above which non-maximum suppression drops a mask.
            crops_n_layers: layers of tiles run besides the whole image (layer i has
                ``2**i x 2**i`` tiles).
            crop_overlap_ratio: overlap of the first layer's tiles, as a fraction of the
                image's short side.
            points_per_crop: points per side of the prompt grid.
            crop_n_points_downscale_factor: layer i's grid has
                ``points_per_crop / factor**i`` points per side.
            output_rle_mask: also return ``rle_mask``, the masks as uncompressed RLE.
            output_bboxes_mask: also return ``bounding_boxes`` ``[K, 4]`` (x0, y0, x1, y1).

        Returns:
            ``{"masks": K [H, W] bool arrays, "scores": [K] float32 tensor}`` by decreasing
            score, plus ``"rle_mask"`` / ``"bounding_boxes"`` when asked for.
        """
        if points_per_batch is not None:
            check_integer("points_per_batch", points_per_batch, 1, " (or None for all)")
        check_integer("crops_n_layers", crops_n_layers, 0)
        check_integer("points_per_crop", points_per_crop, 1)
        check_integer("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1)
        for name, value in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
            ("stability_score_offset", stability_score_offset),
            ("mask_threshold", mask_threshold),
            ("crops_nms_thresh", crops_nms_thresh),
            ("crop_overlap_ratio", crop_overlap_ratio),
        ):
            check_number(name, value)
        if not 0.0 <= crop_overlap_ratio < 1.0:
            raise ValueError(f"crop_overlap_ratio must be at least 0 and below 1, got {crop_overlap_ratio!r}")
        options = dict(
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            mask_threshold=mask_threshold,
            crops_nms_thresh=crops_nms_thresh,
            crops_n_layers=crops_n_layers,
            crop_overlap_ratio=crop_overlap_ratio,
            points_per_crop=points_per_crop,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
        )
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        results = []
        for item in images:
            result = self.generate(load_image(item, max_pixels=self.max_pixels), **options)
            if not output_rle_mask:
                result.pop("rle_mask")
            if not output_bboxes_mask:
                result.pop("bounding_boxes")
            results.append(result)
        return results[0] if single else results

    @torch.inference_mode()
    def generate(
        self,
        image: Any,
        *,
        points_per_batch: int | None,
        pred_iou_thresh: float,
        stability_score_thresh: float,
        stability_score_offset: float,
        mask_threshold: float,
        crops_nms_thresh: float,
        crops_n_layers: int,
        crop_overlap_ratio: float,
        points_per_crop: int,
        crop_n_points_downscale_factor: int,
    ) -> dict[str, Any]:
        """Masks of one RGB PIL image: ``masks``, ``scores``, ``rle_mask``, ``bounding_boxes``."""
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W] uint8
        height, width = pixels.shape[-2:]
        grids = [
            amg.point_grid(int(points_per_crop / (crop_n_points_downscale_factor**layer)))
            for layer in range(crops_n_layers + 1)
        ]
        scores, boxes, masks = [], [], []
        for crop_box, layer in amg.crop_boxes(crops_n_layers, crop_overlap_ratio, (height, width)):
            left, top, right, bottom = crop_box
            crop = pixels[:, top:bottom, left:right]
            crop_scores, crop_boxes_, crop_masks, reshaped = self._crop_masks(
                crop,
                grids[layer],
                crop_box=crop_box,
                image_size=(height, width),
                points_per_batch=points_per_batch,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                stability_score_offset=stability_score_offset,
                mask_threshold=mask_threshold,
            )
            scores.append(crop_scores)
            boxes.append(crop_boxes_ + torch.tensor([left, top, left, top]))
            masks.extend((crop_box, reshaped, mask) for mask in crop_masks)
        all_scores = torch.cat(scores)
        all_boxes = torch.cat(boxes)
        keep = amg.nms(all_boxes.float(), all_scores, crops_nms_thresh)
        full = torch.zeros(len(keep), height, width, dtype=torch.bool)
        # Only the masks that survive NMS are upsampled again, crop by crop (the same
        # numbers: each plane's upsampling depends on that plane alone, see _upsample).
        by_crop: dict[tuple[int, ...], list[int]] = {}
        for row, index in enumerate(keep.tolist()):
            by_crop.setdefault(tuple(masks[index][0]), []).append(row)
        keep_list = keep.tolist()
        for (left, top, right, bottom), rows in by_crop.items():
            reshaped = masks[keep_list[rows[0]]][1]
            for first in range(0, len(rows), UPSAMPLE_CHUNK):
                chunk = rows[first : first + UPSAMPLE_CHUNK]
                low_res = torch.stack([masks[keep_list[row]][2] for row in chunk]).to(self.device)
                logits = self._upsample(low_res, (bottom - top, right - left), reshaped)
                full[chunk, top:bottom, left:right] = (logits > mask_threshold).cpu()
        return {
            "masks": list(full.numpy()),
            "scores": all_scores[keep],
            "rle_mask": amg.masks_to_rle(full),
            "bounding_boxes": all_boxes[keep],
        }

    def _crop_masks(
        self,
        crop: torch.Tensor,
        grid: np.ndarray,
        *,
        crop_box: list[int],
        image_size: tuple[int, int],
        points_per_batch: int | None,
        pred_iou_thresh: float,
        stability_score_thresh: float,
        stability_score_offset: float,
        mask_threshold: float,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[int]]:
        """One crop's masks that pass the filters: ``(scores [k], boxes [k, 4] in crop
        pixels, k [4G, 4G] low-resolution mask logits, the processor's reshaped size)``, in
        prompt order then mask order.

        Full-size logits exist for UPSAMPLE_CHUNK masks at a time, for the filters and the
        boxes; the masks are kept at low resolution until NMS has chosen. Keeping every
        passing mask at full size (up to 3 x points_per_batch float maps per batch, and
        hundreds of bool maps before NMS) took 3.6 GB for one 3-megapixel photo and more
        than 13 GB for a 12-megapixel one."""
        model, decoder = self.model, self.model.mask_decoder
        crop_height, crop_width = crop.shape[-2:]
        inputs = self.processor(crop)
        reshaped = inputs["reshaped_input_sizes"][0].tolist()
        embeddings = model.get_image_embeddings(inputs["pixel_values"].to(self.device))
        image_pe = model.get_image_wide_positional_embeddings()
        # Grid points in crop pixels, then in pixels of the resized crop (float64 until the
        # prompt encoder's projection, as in the reference).
        new_height, new_width = resized_shape(crop_height, crop_width, self.processor.target_size)
        points = grid * np.array([crop_width, crop_height])
        points[:, 0] *= new_width / crop_width
        points[:, 1] *= new_height / crop_height
        points = torch.from_numpy(points).to(self.device)
        batch = len(points) if points_per_batch is None else points_per_batch

        scores, boxes, masks = [], [], []
        for start in range(0, len(points), batch):
            prompt_points = points[start : start + batch][None, :, None]  # [1, P, 1, 2]
            labels = torch.ones(prompt_points.shape[:-1], dtype=torch.int64, device=self.device)
            sparse, dense = model.prompt_encoder(prompt_points, labels, None, None)
            tokens, keys = decoder.run_transformer(embeddings, image_pe, sparse, dense)
            iou = decoder.predict_iou(tokens)[0, :, 1:]  # [P, M] (multimask output)
            keep = iou > pred_iou_thresh if pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            prompts = keep.any(dim=1).nonzero().flatten()
            if len(prompts) == 0:
                continue
            low_res = decoder.predict_masks(tokens[0, prompts], keys[0, prompts])[:, 1:]  # [p, M, 4G, 4G]
            kept = keep[prompts]
            kept_low_res, kept_scores = low_res[kept], iou[prompts][kept]
            for first in range(0, len(kept_low_res), UPSAMPLE_CHUNK):
                chunk_low_res = kept_low_res[first : first + UPSAMPLE_CHUNK]
                mask_scores = kept_scores[first : first + UPSAMPLE_CHUNK]
                logits = self._upsample(chunk_low_res, (crop_height, crop_width), reshaped)  # [c, h, w]
                if stability_score_thresh > 0.0:
                    stable = amg.stability_scores(logits, mask_threshold, stability_score_offset) > stability_score_thresh
                    logits, mask_scores, chunk_low_res = logits[stable], mask_scores[stable], chunk_low_res[stable]
                mask_boxes = amg.mask_boxes(logits > mask_threshold)
                inside = ~amg.near_crop_edge(mask_boxes, crop_box, image_size)
                scores.append(mask_scores[inside].cpu())
                boxes.append(mask_boxes[inside].cpu())
                masks.extend(chunk_low_res[inside].cpu().unbind(0))
        if not scores:
            return torch.zeros(0), torch.zeros(0, 4, dtype=torch.int64), [], reshaped
        return torch.cat(scores), torch.cat(boxes), masks, reshaped

    def _upsample(self, low_res: torch.Tensor, size: tuple[int, int], reshaped: list[int]) -> torch.Tensor:
        """Mask logits ``[k, 4G, 4G]`` to ``[k, h, w]`` with the processor's
        ``post_process_masks``, in groups of three.

        The reference upsamples ``[prompts, 3, 4G, 4G]`` (all three masks of every prompt),
        and PyTorch's bilinear kernel rounds differently with 3 channels than with any
        other count (a few 1e-6 of a logit, enough to move pixels near the threshold). Each
        plane's result depends only on that plane and the channel count, so the kept masks
        go as ``[ceil(k / 3), 3]`` (the last group padded with copies): the reference's
        numbers, for the masks that passed the IoU filter only.
        """
        count = low_res.shape[0]
        padding = -count % 3
        if padding:
            low_res = torch.cat([low_res, low_res[-1:].expand(padding, -1, -1)])
        grouped = low_res.unflatten(0, (-1, 3))
        upsampled = self.processor.post_process_masks([grouped], [size], [reshaped], binarize=False)[0]
        return upsampled.flatten(0, 1)[:count]
