"""SAM's prompt encoder: points, boxes and masks to the mask decoder's prompt embeddings.

Points and box corners are encoded with random Fourier features of their position (the
``shared_image_embedding`` Gaussian matrix, also used for the image's own positional
encoding) plus a learned embedding per kind (negative point, positive point, box
top-left, box bottom-right); a mask prompt is downscaled 4x by small convolutions into
a dense embedding added to the image embeddings, and without one a learned
``no_mask_embed`` is used.

Point labels: ``1`` foreground, ``0`` background, ``-1`` not a point (the padding point
appended when there is no box), ``-10`` padding to ignore.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from omniseg.models.sam.config import SamPromptEncoderConfig, SamVisionConfig
from omniseg.models.segformer.encoder import activation

PAD_LABEL = -10
NOT_A_POINT_LABEL = -1


class SamPositionalEmbedding(nn.Module):
    """Random Fourier features: ``[..., 2]`` coordinates in ``[0, 1]`` ->
    ``[..., 2 * num_pos_feats]`` = ``(sin(2 pi (2x - 1) G), cos(...))``."""

    def __init__(self, config: SamVisionConfig) -> None:
        super().__init__()
        self.scale = config.scale
        self.positional_embedding = nn.Parameter(self.scale * torch.randn(2, config.num_pos_feats))

    def forward(self, coordinates: torch.Tensor, input_size: int | None = None) -> torch.Tensor:
        """``coordinates [..., 2]`` as ``(x, y)``: in ``[0, 1]``, or in pixels of an
        ``input_size`` square when it is given."""
        if input_size is not None:
            coordinates = coordinates / input_size
        # The reference computes up to here in the coordinates' own dtype (float64 for
        # the pipeline's point grid) and casts just before the projection.
        coordinates = (2 * coordinates - 1).to(self.positional_embedding.dtype)
        projected = 2 * math.pi * (coordinates @ self.positional_embedding)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SamMaskEmbedding(nn.Module):
    """Mask prompt ``[B, 1, 4G, 4G]`` -> dense embedding ``[B, hidden, G, G]``."""

    def __init__(self, config: SamPromptEncoderConfig) -> None:
        super().__init__()
        inner = config.mask_input_channels // 4
        self.act = activation(config.hidden_act)
        self.conv1 = nn.Conv2d(1, inner, kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(inner, config.mask_input_channels, kernel_size=2, stride=2)
        self.conv3 = nn.Conv2d(config.mask_input_channels, config.hidden_size, kernel_size=1)
        self.layer_norm1 = ChannelsFirstLayerNorm(inner, eps=config.layer_norm_eps)
        self.layer_norm2 = ChannelsFirstLayerNorm(inner * 4, eps=config.layer_norm_eps)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.layer_norm1(self.conv1(masks)))
        hidden = self.act(self.layer_norm2(self.conv2(hidden)))
        return self.conv3(hidden)


class SamPromptEncoder(nn.Module):
    """Sparse (points, boxes) and dense (mask) prompt embeddings.

    The Fourier-feature module is the model's ``shared_image_embedding``, passed in (the
    reference ties it; checkpoints may store a second copy, which loading ignores).
    """

    def __init__(self, config: SamPromptEncoderConfig, *, shared_embedding: SamPositionalEmbedding) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the parameter belongs to the parent model.
        object.__setattr__(self, "shared_embedding", shared_embedding)
        self.mask_embed = SamMaskEmbedding(config)
        self.no_mask_embed = nn.Embedding(1, config.hidden_size)
        self.point_embed = nn.ModuleList(
            nn.Embedding(1, config.hidden_size) for _ in range(config.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, config.hidden_size)
        self.input_image_size = config.image_size
        self.grid_size = config.image_embedding_size

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, *, pad: bool) -> torch.Tensor:
        """``points [B, P, n, 2]`` (pixels of the model's input), ``labels [B, P, n]`` ->
        ``[B, P, n (+1 with pad), hidden]``."""
        points = points + 0.5  # the centre of the pixel
        if pad:
            points = torch.cat([points, points.new_zeros(*points.shape[:2], 1, 2)], dim=2)
            labels = torch.cat([labels, labels.new_full((*labels.shape[:2], 1), NOT_A_POINT_LABEL)], dim=2)
        embedding = self.shared_embedding(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == NOT_A_POINT_LABEL, self.not_a_point_embed.weight, embedding)
        embedding = torch.where(labels == PAD_LABEL, torch.zeros_like(embedding), embedding)
        embedding = torch.where(labels == 0, embedding + self.point_embed[0].weight, embedding)
        return torch.where(labels == 1, embedding + self.point_embed[1].weight, embedding)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes [B, nb, 4]`` as ``x0, y0, x1, y1`` -> corner embeddings ``[B, nb, 2, hidden]``."""
        corners = (boxes + 0.5).unflatten(-1, (2, 2))
        embedding = self.shared_embedding(corners, self.input_image_size)
        kinds = torch.cat([self.point_embed[2].weight, self.point_embed[3].weight])  # [2, hidden]
        return embedding + kinds

    def forward(
        self,
        input_points: torch.Tensor | None,
        input_labels: torch.Tensor | None,
        input_boxes: torch.Tensor | None,
        input_masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Returns ``(sparse [B, P, n, hidden] or None, dense [B, hidden, G, G])``."""
        sparse = None
        batch = 1
        if input_points is not None:
            batch = input_points.shape[0]
            if input_labels is None:
                raise ValueError("input_points need input_labels")
            sparse = self.embed_points(input_points, input_labels, pad=input_boxes is None)
        if input_boxes is not None:
            batch = input_boxes.shape[0]
            boxes = self.embed_boxes(input_boxes)
            sparse = boxes if sparse is None else torch.cat([sparse, boxes], dim=2)
        if input_masks is not None:
            dense = self.mask_embed(input_masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, self.grid_size, self.grid_size)
        return sparse, dense
