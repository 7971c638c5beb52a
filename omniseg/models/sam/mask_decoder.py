"""SAM's mask decoder: a two-way transformer between prompt tokens and image tokens, then
mask and mask-quality (IoU) heads.

Shapes: ``B`` images, ``P`` prompts per image (the point batch), ``n`` tokens per prompt
(1 IoU token + ``num_multimask_outputs + 1`` mask tokens + the prompt's sparse
embeddings), ``N = G * G`` image tokens of width ``C``.

Every prompt of an image starts from the same image tokens, so before the first layer
changes them per prompt they are kept once per image (``[B, 1, N, C]``) and their
projections are computed once: the reference copies them ``P`` times first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omniseg.models.sam.config import SamMaskDecoderConfig
from omniseg.models.sam.vision_encoder import SamMLPBlock
from omniseg.ops.linear import Linear, linear


class SamAttention(nn.Module):
    """Multi-head attention whose projections may narrow the width to
    ``hidden_size / downsample_rate``. Inputs ``[B, P or 1, tokens, C]``; a prompt axis of 1
    is shared by every prompt. Output ``[B, P, query tokens, C]``."""

    def __init__(self, config: SamMaskDecoderConfig, *, downsample_rate: int) -> None:
        super().__init__()
        internal = config.hidden_size // downsample_rate
        if internal % config.num_attention_heads:
            raise ValueError(
                f"SamMaskDecoderConfig: attention width {internal} is not divisible by "
                f"{config.num_attention_heads} heads"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = internal // config.num_attention_heads
        self.q_proj = Linear(config.hidden_size, internal)
        self.k_proj = Linear(config.hidden_size, internal)
        self.v_proj = Linear(config.hidden_size, internal)
        self.out_proj = Linear(internal, config.hidden_size)

    def _heads(self, projected: torch.Tensor, prompts: int) -> torch.Tensor:
        # [B, P or 1, T, internal] -> [B, P, heads, T, head_dim] (a view for shared inputs)
        split = projected.unflatten(-1, (self.num_heads, self.head_dim)).transpose(2, 3)
        return split.expand(split.shape[0], prompts, *split.shape[2:])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        prompts = max(query.shape[1], key.shape[1], value.shape[1])
        few_query_heads = query.shape[-2] * self.num_heads
        few_key_heads = key.shape[-2] * self.num_heads
        internal = self.num_heads * self.head_dim
        # Between a prompt's few tokens and the image tokens, attention is cheaper with the
        # projections moved onto the few tokens' side (see the two methods).
        if few_query_heads < internal and key.shape[-2] > query.shape[-2]:
            return self._few_queries(query, key, value)
        if few_key_heads < internal and query.shape[-2] > key.shape[-2]:
            return self._few_keys(query, key, value)
        q = self._heads(self.q_proj(query), prompts)
        k = self._heads(self.k_proj(key), prompts)
        v = self._heads(self.v_proj(value), prompts)
        attended = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(attended.transpose(2, 3).flatten(3))

    def _per_head(self, weight: torch.Tensor) -> torch.Tensor:
        # a projection's [internal, C] weight as [heads, head_dim, C]
        return weight.view(self.num_heads, self.head_dim, -1)

    def _few_queries(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Few queries ``[B, P, n, C]`` attending to many keys ``[B, P, N, C]``.

        ``q . (Wk key + bk) = (Wk^T q) . key + q . bk``: the last term is the same for every
        key of a query and cancels in the softmax, and ``softmax . (Wv value + bv) =
        Wv (softmax . value) + bv`` (the weights sum to 1). So the keys and values are never
        projected: ``heads x n`` (56 for SAM) products with the ``C``-wide image tokens
        replace two ``C -> C/2`` (128) projections of all of them.
        """
        batch, prompts, count, _ = query.shape
        q = self.q_proj(query).unflatten(-1, (self.num_heads, self.head_dim)).transpose(2, 3)  # [B, P, h, n, d]
        # The softmax scale goes on the few folded queries, not on the [h*n, N] logits.
        folded = torch.einsum("bphnd,hdc->bphnc", q * self.head_dim**-0.5, self._per_head(self.k_proj.weight))
        logits = _batched_matmul(folded.flatten(2, 3), key.transpose(-1, -2))  # [B, P, h*n, N]
        context = _batched_matmul(logits.softmax(dim=-1), value).unflatten(2, (self.num_heads, count))  # [B, P, h, n, C]
        attended = torch.einsum("bphnc,hdc->bphnd", context, self._per_head(self.v_proj.weight))
        attended = attended + self.v_proj.bias.view(self.num_heads, 1, self.head_dim)
        return self.out_proj(attended.transpose(2, 3).flatten(3))

    def _few_keys(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Many queries ``[B, P, N, C]`` attending to few keys ``[B, P, m, C]``.

        ``(Wq query + bq) . k = query . (Wq^T k) + bq . k`` and the output projection of
        ``softmax . v`` is ``softmax . (Wo v)``: the queries are never projected and the
        attended values never are either; ``heads x m`` products per image token replace
        the ``C -> C/2`` query projection and the ``C/2 -> C`` output projection.

        The softmax scale, the query bias and the output bias all go on the few keys' side
        too, so that no pass over the ``[N, h*m]`` logits or the ``[N, C]`` output is spent
        on them: the output bias is added to every projected value divided by the number
        of heads (each head's weights sum to 1, so every output row gets it once).
        """
        batch, prompts, count, channels = key.shape
        k = self.k_proj(key).unflatten(-1, (self.num_heads, self.head_dim)).transpose(2, 3)  # [B, P, h, m, d]
        k = k * self.head_dim**-0.5
        v = self.v_proj(value).unflatten(-1, (self.num_heads, self.head_dim)).transpose(2, 3)
        q_weight = self._per_head(self.q_proj.weight)  # [h, d, C]
        folded = torch.einsum("bphmd,hdc->bphmc", k, q_weight).flatten(2, 3)  # [B, P, h*m, C]
        offsets = torch.einsum("bphmd,hd->bphm", k, self.q_proj.bias.view(self.num_heads, self.head_dim))
        # Logits laid out [B, P, h*m, N]: the softmax over a head's m keys then runs along
        # the contiguous image axis (a softmax over a last axis of 7 is slow).
        logits = _batched_matmul(folded, query.transpose(-1, -2), add=offsets.flatten(2)[..., None])
        weights = logits.unflatten(2, (self.num_heads, count)).softmax(dim=3).flatten(2, 3)  # [B, P, h*m, N]
        # out_proj.weight [C, internal] per head: [C, h, d]
        out_weight = self.out_proj.weight.view(channels, self.num_heads, self.head_dim)
        projected_values = torch.einsum("bphmd,chd->bphmc", v, out_weight).flatten(2, 3)  # [B, P, h*m, C]
        projected_values = projected_values + self.out_proj.bias / self.num_heads
        return torch.matmul(weights.transpose(-1, -2), projected_values)


def _batched_matmul(few: torch.Tensor, many: torch.Tensor, *, add: torch.Tensor | None = None) -> torch.Tensor:
    """``few [B, P, a, b] @ many [B, P or 1, b, c]`` (``+ add [B, P, a, 1]``, summed inside
    the product rather than in a second pass over the ``[a, c]`` result); when ``many`` is
    shared by the prompts (axis of 1), one product of all prompts' rows with it, without
    copying it P times."""
    batch, prompts, rows, inner = few.shape
    if many.shape[1] == 1 and prompts > 1:
        few, many = few.reshape(batch, prompts * rows, inner), many[:, 0]
    else:
        few, many = few.reshape(batch * prompts, rows, inner), many.expand(batch, prompts, -1, -1).flatten(0, 1)
    if add is None:
        product = torch.bmm(few, many)
    else:
        product = torch.baddbmm(add.reshape(few.shape[0], few.shape[1], 1), few, many)
    return product.view(batch, prompts, rows, -1)


class SamTwoWayAttentionBlock(nn.Module):
    """Tokens self-attend, attend to the image, go through an MLP; then the image attends to
    the tokens. Post-norm (LayerNorm after each residual)."""

    def __init__(self, config: SamMaskDecoderConfig, *, skip_first_layer_pe: bool) -> None:
        super().__init__()
        width, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = SamAttention(config, downsample_rate=1)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.cross_attn_token_to_image = SamAttention(config, downsample_rate=config.attention_downsample_rate)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = SamMLPBlock(hidden_size=width, mlp_dim=config.mlp_dim, hidden_act=config.hidden_act)
        self.layer_norm3 = nn.LayerNorm(width, eps=eps)
        self.layer_norm4 = nn.LayerNorm(width, eps=eps)
        self.cross_attn_image_to_token = SamAttention(config, downsample_rate=config.attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries [B, P, n, C]``, ``keys [B, P or 1, N, C]`` and their positional
        embeddings -> updated ``(queries [B, P, n, C], keys [B, P, N, C])``."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            query = queries + query_pe
            queries = queries + self.self_attn(query, query, queries)
        queries = self.layer_norm1(queries)

        positioned_keys = keys + key_pe
        queries = self.layer_norm2(queries + self.cross_attn_token_to_image(queries + query_pe, positioned_keys, keys))
        queries = self.layer_norm3(queries + self.mlp(queries))

        attended = self.cross_attn_image_to_token(positioned_keys, queries + query_pe, queries)
        # attended is a fresh [B, P, N, C] tensor: summing into it saves allocating another.
        keys = self.layer_norm4(attended.add_(keys))
        return queries, keys


class SamTwoWayTransformer(nn.Module):
    """``num_hidden_layers`` two-way blocks, then a last token-to-image attention."""

    def __init__(self, config: SamMaskDecoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SamTwoWayAttentionBlock(config, skip_first_layer_pe=i == 0) for i in range(config.num_hidden_layers)
        )
        self.final_attn_token_to_image = SamAttention(config, downsample_rate=config.attention_downsample_rate)
        # The reference builds this one norm with PyTorch's default eps.
        self.layer_norm_final_attn = nn.LayerNorm(config.hidden_size)

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [B, P, n, C]``, ``image [B, 1, N, C]``, ``image_pe [1, 1, N, C]`` ->
        ``(tokens [B, P, n, C], image tokens [B, P, N, C])``."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        attended = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.layer_norm_final_attn(queries + attended), keys


class SamFeedForward(nn.Module):
    """MLP with ReLU between ``num_layers`` linear layers: ``proj_in``, ``layers``, ``proj_out``."""

    def __init__(self, *, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.proj_in = Linear(input_dim, hidden_dim)
        self.layers = nn.ModuleList(Linear(hidden_dim, hidden_dim) for _ in range(num_layers - 2))
        self.proj_out = Linear(hidden_dim, output_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.proj_in(hidden))
        for layer in self.layers:
            hidden = F.relu(layer(hidden))
        return self.proj_out(hidden)


class SamMaskDecoder(nn.Module):
    """Image embeddings + prompt embeddings -> low-resolution mask logits and IoU scores.

    :meth:`forward` is :meth:`run_transformer`, :meth:`predict_iou` and
    :meth:`predict_masks` in a row; the mask-generation pipeline calls them apart so that
    masks are computed only for prompts whose IoU score can pass its filter.
    """

    def __init__(self, config: SamMaskDecoderConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, width)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, width)
        self.transformer = SamTwoWayTransformer(config)
        self.upscale_conv1 = nn.ConvTranspose2d(width, width // 4, kernel_size=2, stride=2)
        self.upscale_conv2 = nn.ConvTranspose2d(width // 4, width // 8, kernel_size=2, stride=2)
        self.upscale_layer_norm = nn.LayerNorm(width // 4, eps=1e-6)
        self.output_hypernetworks_mlps = nn.ModuleList(
            SamFeedForward(input_dim=width, hidden_dim=width, output_dim=width // 8, num_layers=3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = SamFeedForward(
            input_dim=width,
            hidden_dim=config.iou_head_hidden_dim,
            output_dim=self.num_mask_tokens,
            num_layers=config.iou_head_depth,
        )

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor | None,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_embeddings [B, C, G, G]``, ``image_pe [1, C, G, G]``, ``sparse [B, P, k, C]``
        (or None), ``dense [B, C, G, G]`` -> ``(tokens [B, P, n, C], image tokens
        [B, P, G, G, C])``."""
        batch, channels, grid, _ = image_embeddings.shape
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])  # [1 + M, C]
        prompts = 1 if sparse is None else sparse.shape[1]
        tokens = output_tokens.expand(batch, prompts, -1, -1)
        if sparse is not None:
            tokens = torch.cat([tokens, sparse.to(tokens.dtype)], dim=2)
        image = (image_embeddings + dense).flatten(2).transpose(1, 2)[:, None]  # [B, 1, N, C]
        image_pe = image_pe.flatten(2).transpose(1, 2)[:, None]  # [1, 1, N, C]
        tokens, keys = self.transformer(tokens, image, image_pe)
        keys = keys.expand(batch, prompts, -1, -1)
        return tokens, keys.unflatten(2, (grid, grid))

    def predict_iou(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, P, n, C]`` -> IoU scores of all ``1 + M`` masks ``[B, P, 1 + M]``."""
        return self.iou_prediction_head(tokens[:, :, 0])

    def predict_masks(self, tokens: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``tokens [..., n, C]``, ``keys [..., G, G, C]`` (same leading axes) -> mask
        logits of all ``1 + M`` mask tokens ``[..., 1 + M, 4G, 4G]``."""
        upscaled = self.upscale(keys)  # [..., 4G, 4G, C / 8]
        mask_tokens = tokens[..., 1 : 1 + self.num_mask_tokens, :]
        hyper = torch.stack(
            [mlp(mask_tokens[..., i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=-2
        )  # [..., 1 + M, C / 8]
        height, width = upscaled.shape[-3:-1]
        masks = torch.matmul(hyper, upscaled.flatten(-3, -2).transpose(-1, -2))
        return masks.unflatten(-1, (height, width))

    def upscale(self, keys: torch.Tensor) -> torch.Tensor:
        """Two stride-2 transposed convolutions (LayerNorm + GELU after the first, GELU after
        the second), channels-last: ``[..., G, G, C] -> [..., 4G, 4G, C / 8]``.

        A 2x2 stride-2 transposed convolution is one linear map per input pixel onto its
        four output pixels; done as such, the norm and the activations act on the last axis.
        """
        hidden = _pixel_transposed_conv(keys, self.upscale_conv1)
        hidden = F.gelu(self.upscale_layer_norm(hidden))
        return F.gelu(_pixel_transposed_conv(hidden, self.upscale_conv2))

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor | None,
        dense: torch.Tensor,
        *,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(masks [B, P, k, 4G, 4G], iou_scores [B, P, k])`` with ``k = M`` masks
        (multimask) or the single-mask token's one."""
        tokens, keys = self.run_transformer(image_embeddings, image_pe, sparse, dense)
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return self.predict_masks(tokens, keys)[:, :, chosen], self.predict_iou(tokens)[:, :, chosen]


def _pixel_transposed_conv(hidden: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """``conv`` (kernel 2, stride 2) on channels-last ``[..., H, W, C_in]`` ->
    ``[..., 2H, 2W, C_out]``."""
    c_in, c_out = conv.weight.shape[:2]
    # weight [C_in, C_out, 2, 2] -> rows ordered (dy, dx, C_out)
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in)
    out = linear(hidden, weight, conv.bias.repeat(4))  # [..., H, W, 4 * C_out]
    height, width = hidden.shape[-3:-1]
    out = out.unflatten(-1, (2, 2, c_out))  # [..., H, W, dy, dx, C_out]
    out = out.transpose(-4, -3)  # [..., H, dy, W, dx, C_out]
    return out.reshape(*hidden.shape[:-3], 2 * height, 2 * width, c_out)
