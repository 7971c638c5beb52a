"""Optimiser and learning-rate schedule of the segmentation recipes.

AdamW with two learning rates (the pretrained backbone trains slower, by
``backbone_lr_multiplier``, as in Mask2Former's and SegFormer's recipes) and no weight decay
on biases and normalisation parameters; the schedule is a linear warm-up followed by a
polynomial decay to zero over the whole run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Parameter-name prefixes of the pretrained backbone, per architecture.
BACKBONE_PREFIXES: dict[str, tuple[str, ...]] = {
    "mask2former": ("model.pixel_level_module.encoder.",),
    "maskformer": ("model.pixel_level_module.encoder.",),
    "segformer": ("segformer.",),
}


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    backbone_prefixes: Sequence[str] = (),
    backbone_lr_multiplier: float = 0.1,
) -> list[dict]:
    """Up to four AdamW groups: (backbone or not) x (decayed or not).

    Parameters with at most one dimension (biases, norm scales) and embeddings tables are
    not decayed: shrinking them towards zero regularises nothing useful.
    """
    embedding_tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        backbone = any(name.startswith(prefix) for prefix in backbone_prefixes)
        decay = param.ndim > 1 and id(param) not in embedding_tables
        groups.setdefault((backbone, decay), []).append(param)
    result = []
    for (backbone, decay), params in sorted(groups.items()):
        result.append(
            {
                "params": params,
                "lr": lr * (backbone_lr_multiplier if backbone else 1.0),
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{'backbone' if backbone else 'head'}{'' if decay else '_no_decay'}",
            }
        )
    return result


def build_optimizer(
    model: nn.Module,
    *,
    model_type: str,
    lr: float,
    weight_decay: float = 0.05,
    backbone_lr_multiplier: float = 0.1,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the architecture's backbone prefixes."""
    groups = param_groups(
        model,
        lr=lr,
        weight_decay=weight_decay,
        backbone_prefixes=BACKBONE_PREFIXES.get(model_type, ()),
        backbone_lr_multiplier=backbone_lr_multiplier,
    )
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def warmup_poly_factor(step: int, *, warmup_steps: int, total_steps: int, power: float = 1.0, warmup_start: float = 1e-3) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based).

    Linear from ``warmup_start`` to 1 over ``warmup_steps``, then ``(1 - t) ** power`` with
    ``t`` the fraction of the post-warm-up steps done, reaching 0 at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return (1.0 - progress) ** power


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, power: float = 1.0, steps_done: int = 0
) -> LambdaLR:
    """:class:`LambdaLR` over :func:`warmup_poly_factor`; call ``step()`` after every optimiser step.
    ``steps_done > 0`` replaces a run's schedule after that many steps (the optimiser's
    groups already hold their ``initial_lr``)."""
    return LambdaLR(
        optimizer,
        lambda step: warmup_poly_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, power=power),
        last_epoch=steps_done - 1,
    )
