"""Trainer parts in isolation: schedule, parameter groups, samplers, checkpoints."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from omniseg.train import checkpointing
from omniseg.train.distributed import GlobalBatchSampler, ShardSampler
from omniseg.train.optim import build_optimizer, build_scheduler, param_groups, warmup_poly_factor


def test_warmup_then_poly_schedule() -> None:
    factors = [warmup_poly_factor(s, warmup_steps=4, total_steps=14, power=1.0) for s in range(15)]
    assert factors[0] == pytest.approx(1e-3)
    assert factors[2] == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert factors[4] == 1.0
    assert factors[9] == pytest.approx(0.5)
    assert factors[14] == 0.0
    assert warmup_poly_factor(9, warmup_steps=4, total_steps=14, power=0.9) == pytest.approx(0.5**0.9)


def test_scheduler_drives_every_group() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    optimizer = build_optimizer(model, model_type="segformer", lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=0, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25])


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4))
        self.queries = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)


def test_param_groups_backbone_multiplier_and_no_decay() -> None:
    groups = {g["name"]: g for g in param_groups(_Toy(), lr=1e-3, weight_decay=0.05,
                                                  backbone_prefixes=("backbone.",), backbone_lr_multiplier=0.1)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["backbone"]["weight_decay"] == 0.05
    assert len(groups["backbone"]["params"]) == 1  # the conv weight; its bias and the norm: no decay
    assert len(groups["backbone_no_decay"]["params"]) == 3 and groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert groups["head"]["lr"] == 1e-3 and len(groups["head"]["params"]) == 1
    assert len(groups["head_no_decay"]["params"]) == 2  # head bias and the embedding table


def test_global_batch_sampler_blocks_match_accumulation_order() -> None:
    single = list(GlobalBatchSampler(10, batch_size=2, num_replicas=1, seed=3))
    ranks = [list(GlobalBatchSampler(10, batch_size=2, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    # Global batches of 4 (the last 2 samples of 10 are dropped in the 2-process run).
    assert len(ranks[0]) == len(ranks[1]) == 4
    for step in range(2):
        assert ranks[0][2 * step : 2 * step + 2] == single[4 * step : 4 * step + 2]
        assert ranks[1][2 * step : 2 * step + 2] == single[4 * step + 2 : 4 * step + 4]
    assert sorted(ranks[0] + ranks[1]) == sorted(single[:8])
    other_epoch = GlobalBatchSampler(10, batch_size=2, seed=3)
    other_epoch.set_position(1, 0)
    assert list(other_epoch) != single
    resumed = GlobalBatchSampler(10, batch_size=2, seed=3)
    resumed.set_position(0, 4)
    assert list(resumed) == single[4:] and len(resumed) == 6


def test_shard_sampler_covers_everything_once() -> None:
    shards = [list(ShardSampler(7, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))


def test_checkpoint_round_trip_keeps_latest_and_rng(tmp_path) -> None:
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    rng = checkpointing.capture_rng_state()
    expected = (torch.rand(3), np.random.rand(), random.random())
    for step in (1, 2, 3):
        checkpointing.save_checkpoint(tmp_path, {"step": step, "rng": [rng]}, keep=2)
    files = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert files == ["step-00000002.pt", "step-00000003.pt"]
    latest = checkpointing.latest_checkpoint(tmp_path)
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 3
    state = checkpointing.load_checkpoint(latest)
    checkpointing.restore_rng_state(state["rng"][0])
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_no_checkpoint_and_broken_pointer(tmp_path) -> None:
    from omniseg.errors import CheckpointError

    assert checkpointing.latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text('{"step": 4, "file": "step-00000004.pt"}')
    with pytest.raises(CheckpointError, match="missing"):
        checkpointing.latest_checkpoint(tmp_path)


def test_semantic_aux_loss_is_cross_entropy_of_the_mask_features() -> None:
    pytest.importorskip("transformers")
    from reference_models import reference_mask2former_config

    from omniseg.models.mask2former import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
    from omniseg.train.semantic_aux import SemanticAuxiliaryLoss

    torch.manual_seed(0)
    config = Mask2FormerConfig.from_dict(reference_mask2former_config().to_dict())
    model = Mask2FormerForUniversalSegmentation(config).train()
    loss_fn = SemanticAuxiliaryLoss(in_channels=config.mask_feature_size, num_labels=config.num_labels,
                                    ignore_index=255, weight=3.0)
    loss_fn.attach(model)
    captured = {}

    def keep(module, inputs, output) -> None:
        captured.setdefault("fpn", output)

    # Mask features by their definition: the 1x1 mask projection of the FPN's last output.
    decoder = model.model.pixel_level_module.decoder
    decoder.layer_1.register_forward_hook(keep)
    labels = torch.randint(0, config.num_labels, (2, 64, 64))
    labels[:, :10] = 255
    model(torch.randn(2, 3, 64, 64))
    got = loss_fn(labels)
    mask_features = torch.nn.functional.conv2d(
        captured["fpn"], decoder.mask_projection.weight, decoder.mask_projection.bias
    )
    logits = torch.nn.functional.interpolate(
        loss_fn.classifier(mask_features), size=(64, 64), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(got, 3.0 * torch.nn.functional.cross_entropy(logits, labels, ignore_index=255))
    got.backward()
    assert loss_fn.classifier.weight.grad.abs().sum() > 0
    assert model.model.pixel_level_module.encoder.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0

    # Nothing labelled: zero, still differentiable; evaluation forwards capture nothing.
    model(torch.randn(1, 3, 64, 64))
    assert loss_fn(torch.full((1, 64, 64), 255)).item() == 0.0
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="no mask features"):
        loss_fn(labels)
    loss_fn.detach()
