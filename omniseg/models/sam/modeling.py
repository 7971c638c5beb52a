"""``SamModel``: Segment Anything (Kirillov et al., 2023) in the hub checkpoints' layout.

The image encoder runs once per image (:meth:`SamModel.get_image_embeddings`); prompts
are then decoded against the stored embeddings (``forward(image_embeddings=...)``) as many
times as needed, which is how the mask-generation pipeline uses it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from omniseg.models.base import PretrainedModel
from omniseg.models.sam.config import SamConfig
from omniseg.models.sam.mask_decoder import SamMaskDecoder
from omniseg.models.sam.prompt_encoder import SamPositionalEmbedding, SamPromptEncoder
from omniseg.models.sam.vision_encoder import SamVisionAttention, SamVisionEncoder


@dataclasses.dataclass
class SamImageSegmentationOutput:
    """Output of :class:`SamModel`.

    Attributes:
        iou_scores: ``[B, P, k]`` predicted IoU of each mask (``k = 3`` with multimask
            output, else 1), ``P`` prompts per image.
        pred_masks: ``[B, P, k, 4G, 4G]`` low-resolution mask logits (256x256 for the hub
            models); the processor's ``post_process_masks`` brings them to image size.
    """

    iou_scores: torch.Tensor
    pred_masks: torch.Tensor

    def __getitem__(self, key: str) -> torch.Tensor:
        return getattr(self, key)


class SamModel(PretrainedModel):
    """Segment Anything: ViT image encoder, prompt encoder, two-way mask decoder."""

    config_class = SamConfig
    architecture = "SamModel"
    # The reference ties the prompt encoder's Fourier features to the model's
    # shared_image_embedding; older checkpoints store the tied copy too.
    ignore_on_load = ("prompt_encoder.shared_embedding.positional_embedding",)
    config: SamConfig

    def __init__(self, config: SamConfig) -> None:
        super().__init__(config)
        self.shared_image_embedding = SamPositionalEmbedding(config.vision_config)
        self.vision_encoder = SamVisionEncoder(config.vision_config)
        self.prompt_encoder = SamPromptEncoder(
            config.prompt_encoder_config, shared_embedding=self.shared_image_embedding
        )
        self.mask_decoder = SamMaskDecoder(config.mask_decoder_config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference's initialisation: linear, convolution and embedding weights
        ~ N(0, initializer_range), zero biases, norms at identity, zero relative and
        absolute positions, Fourier features ~ N(0, scale)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, SamVisionAttention) and module.use_rel_pos:
                nn.init.zeros_(module.rel_pos_h)
                nn.init.zeros_(module.rel_pos_w)
        if self.vision_encoder.pos_embed is not None:
            nn.init.zeros_(self.vision_encoder.pos_embed)
        embedding = self.shared_image_embedding
        nn.init.normal_(embedding.positional_embedding, std=embedding.scale)

    def get_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values [B, 3, S, S]`` -> ``[B, C, G, G]`` image embeddings."""
        return self.vision_encoder(pixel_values)

    def get_image_wide_positional_embeddings(self) -> torch.Tensor:
        """Fourier features of every image-token centre: ``[1, C, G, G]``."""
        size = self.config.prompt_encoder_config.image_embedding_size
        table = self.shared_image_embedding.positional_embedding
        centres = (torch.arange(size, device=table.device, dtype=table.dtype) + 0.5) / size
        grid = torch.stack(
            [centres[None, :].expand(size, size), centres[:, None].expand(size, size)], dim=-1
        )  # [G, G, (x, y)]
        return self.shared_image_embedding(grid).permute(2, 0, 1)[None]

    def get_prompt_embeddings(
        self,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(sparse [B, P, k, C] or None, dense [B, C, G, G])``, see :class:`SamPromptEncoder`."""
        return self.prompt_encoder(input_points, input_labels, input_boxes, input_masks)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        multimask_output: bool = True,
        original_sizes: torch.Tensor | None = None,
        reshaped_input_sizes: torch.Tensor | None = None,
    ) -> SamImageSegmentationOutput:
        """Masks for the prompts of each image.

        Args:
            pixel_values: ``[B, 3, S, S]`` processed images, or else
            image_embeddings: ``[B, C, G, G]`` from :meth:`get_image_embeddings`.
            input_points: ``[B, P, n, 2]`` ``(x, y)`` in pixels of the resized image (the
                processor rescales them); ``P`` prompts of ``n`` points each.
            input_labels: ``[B, P, n]``: 1 foreground, 0 background, -1 not a point,
                -10 padding; all 1 when omitted.
            input_boxes: ``[B, P, 4]`` ``x0, y0, x1, y1`` in pixels of the resized image.
            input_masks: ``[B, 1, 4G, 4G]`` mask logits as a dense prompt.
            multimask_output: three masks per prompt (True) or one.
            original_sizes, reshaped_input_sizes: what the processor returns beside the
                model inputs (for ``post_process_masks``); accepted so that
                ``model(**processor(...))`` works, and not used.
        """
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("pass exactly one of pixel_values and image_embeddings")
        if input_points is not None and input_points.ndim != 4:
            raise ValueError(f"input_points must be [B, P, n, 2], got shape {tuple(input_points.shape)}")
        if input_boxes is not None and input_boxes.ndim != 3:
            raise ValueError(f"input_boxes must be [B, P, 4], got shape {tuple(input_boxes.shape)}")
        if input_points is not None and input_boxes is not None and input_points.shape[1] != input_boxes.shape[1]:
            raise ValueError(
                f"got {input_points.shape[1]} point prompts but {input_boxes.shape[1]} boxes per image; "
                "each box goes with one point prompt"
            )
        if pixel_values is not None:
            image_embeddings = self.get_image_embeddings(pixel_values)
        if input_points is not None and input_points.shape[0] != image_embeddings.shape[0]:
            raise ValueError(
                f"input_points are for {input_points.shape[0]} images, the batch has {image_embeddings.shape[0]}"
            )
        if input_points is not None and input_labels is None:
            input_labels = torch.ones(input_points.shape[:-1], dtype=torch.int64, device=input_points.device)
        sparse, dense = self.prompt_encoder(input_points, input_labels, input_boxes, input_masks)
        masks, iou_scores = self.mask_decoder(
            image_embeddings,
            self.get_image_wide_positional_embeddings(),
            sparse,
            dense,
            multimask_output=multimask_output,
        )
        return SamImageSegmentationOutput(iou_scores=iou_scores, pred_masks=masks)
