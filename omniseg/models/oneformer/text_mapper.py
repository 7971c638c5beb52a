"""The weights of OneFormer's text mapper, which serves its training only.

In training, OneFormer encodes one text per ground-truth segment with a CLIP-style text
encoder and a projector, and pulls the object queries towards them (a contrastive loss).
Inference never runs it, and omniseg does not train OneFormer, so these modules only
*hold* the checkpoint's tensors, with the reference's names and shapes, so that a
checkpoint that carries them loads strictly and is saved back whole::

    text_encoder.positional_embedding                         [context_length, width]
    text_encoder.token_embedding.weight                       [vocab_size, width]
    text_encoder.transformer.layers.{i}.self_attn.{in_proj_weight, in_proj_bias, out_proj.*}
    text_encoder.transformer.layers.{i}.layer_norm{1,2}.*
    text_encoder.transformer.layers.{i}.mlp.fc{1,2}.*          (width -> 4 width -> width)
    text_encoder.ln_final.*
    text_projector.layers.{j}.0.*                             (width -> hidden_dim -> ...)
    prompt_ctx.weight                                         [n_ctx, width] (n_ctx > 0)
"""

from __future__ import annotations

import torch
from torch import nn

from omniseg.models.mask2former.transformer_decoder import MLPPredictionHead
from omniseg.models.oneformer.config import OneFormerConfig


class TextMLP(nn.Module):
    """``fc1`` (width -> 4 width) and ``fc2`` (back)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)


class TextTransformerLayer(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, max(width // 64, 1))
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = TextMLP(width)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)


class TextTransformer(nn.Module):
    def __init__(self, width: int, num_layers: int, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TextTransformerLayer(width, eps) for _ in range(num_layers))


class TextEncoder(nn.Module):
    def __init__(self, config: OneFormerConfig) -> None:
        super().__init__()
        width = config.text_encoder_width
        self.transformer = TextTransformer(width, config.text_encoder_num_layers, config.layer_norm_eps)
        self.positional_embedding = nn.Parameter(torch.zeros(config.text_encoder_context_length, width))
        self.ln_final = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.token_embedding = nn.Embedding(config.text_encoder_vocab_size, width)


class TextProjector(nn.Module):
    """The reference's MLP head layout: ``layers.{j}.0`` linear layers."""

    def __init__(self, input_dim: int, hidden_dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = MLPPredictionHead(input_dim, hidden_dim, hidden_dim, num_layers)


class OneFormerTextMapper(nn.Module):
    """Text encoder, projector and learned prompt context (held, not run; see the module doc)."""

    def __init__(self, config: OneFormerConfig) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(config)
        self.text_projector = TextProjector(
            config.text_encoder_width, config.hidden_dim, config.text_encoder_proj_layers
        )
        if config.text_encoder_n_ctx > 0:
            self.prompt_ctx = nn.Embedding(config.text_encoder_n_ctx, config.text_encoder_width)
