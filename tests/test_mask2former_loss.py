"""Mask2Former's matcher and loss against the reference implementation (transformers).

Both implementations draw their sample points from the global torch RNG in the same order
and shapes, so seeding the RNG identically before each call makes them use the same points;
equal results then show the maths is the same. (A generator-based check shows the points
are really random: a different seed changes the loss.)
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Mask2FormerConfig  # noqa: E402
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss  # noqa: E402

from omniseg.models.mask2former.criterion import Mask2FormerCriterion  # noqa: E402
from omniseg.models.mask2former.matcher import HungarianMatcher  # noqa: E402

WEIGHTS = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def _weight_of(key: str) -> float:
    return WEIGHTS[key.rsplit("_", 1)[0] if key[-1].isdigit() else key]


def random_batch(
    seed: int, counts: list[int], *, queries: int = 10, classes: int = 5, aux_layers: int = 2
):
    """Random predictions ``[B, Q, C+1]``, ``[B, Q, 24, 32]`` and per-image targets."""
    g = torch.Generator().manual_seed(seed)
    batch = len(counts)
    class_logits = torch.randn(batch, queries, classes + 1, generator=g)
    mask_logits = torch.randn(batch, queries, 24, 32, generator=g) * 3
    mask_labels = [(torch.rand(n, 96, 128, generator=g) > 0.5).float() for n in counts]
    class_labels = [torch.randint(0, classes, (n,), generator=g) for n in counts]
    aux = [
        {
            "class_queries_logits": torch.randn(batch, queries, classes + 1, generator=g),
            "masks_queries_logits": torch.randn(batch, queries, 24, 32, generator=g) * 3,
        }
        for _ in range(aux_layers)
    ]
    return class_logits, mask_logits, mask_labels, class_labels, aux


def structured_batch(seed: int, *, queries: int = 8, classes: int = 4):
    """Targets cut from a label map of rectangles; predictions are noisy copies of them,
    so the optimal assignment is far from arbitrary and ties are unlikely."""
    g = torch.Generator().manual_seed(seed)
    class_logits, mask_logits, mask_labels, class_labels = [], [], [], []
    for n in (3, 5):
        masks = torch.zeros(n, 64, 64)
        for k in range(n):
            y, x = torch.randint(0, 40, (2,), generator=g).tolist()
            masks[k, y : y + 24, x : x + 20] = 1.0
        labels = torch.randint(0, classes, (n,), generator=g)
        perm = torch.randperm(queries, generator=g)[:n]
        logits = torch.randn(queries, 16, 16, generator=g)
        cls = torch.randn(queries, classes + 1, generator=g)
        small = torch.nn.functional.interpolate(masks[:, None], size=(16, 16), mode="area")[:, 0]
        logits[perm] = (small * 2 - 1) * 4 + 0.5 * torch.randn(n, 16, 16, generator=g)
        cls[perm, labels] += 3.0
        class_logits.append(cls)
        mask_logits.append(logits)
        mask_labels.append(masks)
        class_labels.append(labels)
    return torch.stack(class_logits), torch.stack(mask_logits), mask_labels, class_labels


def reference_and_ours(num_points: int = 300, classes: int = 5, no_object_weight: float = 0.1):
    config = Mask2FormerConfig(
        num_labels=classes, train_num_points=num_points, no_object_weight=no_object_weight
    )
    return Mask2FormerLoss(config, dict(WEIGHTS)), Mask2FormerCriterion.from_config(config)


@pytest.mark.parametrize("counts", [[3, 1, 7], [2, 0, 4], [10, 10]])
def test_matcher_assignment_equals_reference(counts: list[int]) -> None:
    reference, ours = reference_and_ours()
    class_logits, mask_logits, mask_labels, class_labels, _ = random_batch(0, counts)
    torch.manual_seed(11)
    expected = reference.matcher(mask_logits, class_logits, mask_labels, class_labels)
    torch.manual_seed(11)
    got = ours.matcher(class_logits, mask_logits, mask_labels, class_labels)
    assert len(got) == len(expected)
    for (rows, cols), (ref_rows, ref_cols) in zip(got, expected):
        assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)
        assert len(rows) == min(10, len(ref_cols))


def test_matcher_on_structured_targets_recovers_the_planted_queries() -> None:
    reference, ours = reference_and_ours(classes=4)
    class_logits, mask_logits, mask_labels, class_labels = structured_batch(3)
    torch.manual_seed(5)
    expected = reference.matcher(mask_logits, class_logits, mask_labels, class_labels)
    torch.manual_seed(5)
    got = ours.matcher(class_logits, mask_logits, mask_labels, class_labels)
    for (rows, cols), (ref_rows, ref_cols) in zip(got, expected):
        assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)


def test_matcher_survives_nan_costs() -> None:
    matcher = HungarianMatcher(num_points=50)
    class_logits, mask_logits, mask_labels, class_labels, _ = random_batch(1, [2, 3])
    mask_logits[0, 0] = float("nan")
    matches = matcher(class_logits, mask_logits, mask_labels, class_labels)
    assert [len(r) for r, _ in matches] == [2, 3]


@pytest.mark.parametrize(
    "counts,num_points", [([3, 1, 7], 300), ([2, 0, 4], 300), ([4, 6], 12544)]
)
def test_losses_equal_reference_including_auxiliary(counts: list[int], num_points: int) -> None:
    reference, ours = reference_and_ours(num_points=num_points)
    class_logits, mask_logits, mask_labels, class_labels, aux = random_batch(2, counts)
    torch.manual_seed(7)
    expected = reference(mask_logits, class_logits, mask_labels, class_labels, aux)
    torch.manual_seed(7)
    got = ours(class_logits, mask_logits, mask_labels, class_labels, aux)
    assert set(got) == set(expected)
    assert {"loss_mask_1", "loss_dice_1", "loss_cross_entropy_1"} <= set(got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value * _weight_of(key), rtol=1e-6, atol=1e-6)


def test_loss_gradients_equal_reference() -> None:
    reference, ours = reference_and_ours(classes=4, no_object_weight=0.3)
    class_logits, mask_logits, mask_labels, class_labels = structured_batch(4)
    grads = []
    for criterion, ref in ((reference, True), (ours, False)):
        cl = class_logits.clone().requires_grad_(True)
        ml = mask_logits.clone().requires_grad_(True)
        torch.manual_seed(9)
        if ref:
            losses = criterion(ml, cl, mask_labels, class_labels)
            total = sum(v * _weight_of(k) for k, v in losses.items())
        else:
            total = sum(criterion(cl, ml, mask_labels, class_labels).values())
        total.backward()
        grads.append((total.detach(), cl.grad, ml.grad))
    for ours_t, ref_t in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours_t, ref_t, rtol=1e-5, atol=1e-7)


def test_points_are_random_and_generator_is_honoured() -> None:
    _, ours = reference_and_ours(num_points=64)
    class_logits, mask_logits, mask_labels, class_labels, aux = random_batch(3, [3, 2])

    def total(seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        return float(sum(ours(class_logits, mask_logits, mask_labels, class_labels, aux, g).values()))

    assert total(1) == total(1)
    assert total(1) != total(2)


def test_batch_without_any_target_gives_finite_loss_with_gradient() -> None:
    _, ours = reference_and_ours(num_points=32)
    class_logits, mask_logits, _, _, _ = random_batch(4, [1, 1])
    class_logits.requires_grad_(True)
    mask_logits.requires_grad_(True)
    empty = [torch.zeros(0, 96, 128), torch.zeros(0, 96, 128)]
    labels = [torch.zeros(0, dtype=torch.int64)] * 2
    losses = ours(class_logits, mask_logits, empty, labels)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and float(losses["loss_mask"].detach()) == 0.0
    assert mask_logits.grad is not None and class_logits.grad.abs().sum() > 0
