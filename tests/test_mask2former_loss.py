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


# -- end to end: omniseg's model against the reference model on the same checkpoint -------


def _targets(seed: int, size: tuple[int, int], counts: list[int], classes: int):
    """Per-image rectangle masks (plus one random blob) and class ids at ``size``."""
    g = torch.Generator().manual_seed(seed)
    mask_labels, class_labels = [], []
    for n in counts:
        masks = torch.zeros(n, *size)
        for k in range(n):
            y, x = torch.randint(0, size[0] // 2, (1,), generator=g), torch.randint(0, size[1] // 2, (1,), generator=g)
            masks[k, y : y + size[0] // 2, x : x + size[1] // 3] = 1.0
        mask_labels.append(masks)
        class_labels.append(torch.randint(0, classes, (n,), generator=g))
    return mask_labels, class_labels


@pytest.mark.parametrize("shape", ["small", "deep"])
def test_model_loss_and_gradients_equal_reference(tmp_path, shape: str) -> None:
    from reference_models import TINY_MASK2FORMER_CONFIGS, build_reference_mask2former
    from transformers import Mask2FormerForUniversalSegmentation as ReferenceModel

    from omniseg.models.mask2former import Mask2FormerForUniversalSegmentation

    shape_kwargs = TINY_MASK2FORMER_CONFIGS[shape]
    directory = build_reference_mask2former(tmp_path / shape, **shape_kwargs)
    reference = ReferenceModel.from_pretrained(directory).eval()
    ours = Mask2FormerForUniversalSegmentation.from_pretrained(directory).eval()
    # The tiny configs keep the default 12544 points; fewer keep the test fast and the
    # comparison just as strict (same points on both sides).
    for model in (reference, ours):
        model.criterion.num_points = 2000
        model.criterion.matcher.num_points = 2000
    pixel_values = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    mask_labels, class_labels = _targets(2, (64, 96), [3, 2], shape_kwargs["num_labels"])

    torch.manual_seed(123)
    ref_out = reference(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    torch.manual_seed(123)
    our_out = ours(pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    torch.testing.assert_close(our_out.loss, ref_out.loss, rtol=1e-5, atol=1e-5)

    # The loss dicts term by term, on the reference model's own outputs.
    with torch.no_grad():
        aux = ref_out.auxiliary_logits or reference.get_auxiliary_logits(
            (ref_out.class_queries_logits,), (ref_out.masks_queries_logits,)
        )
        torch.manual_seed(5)
        expected = reference.get_loss_dict(
            ref_out.masks_queries_logits, ref_out.class_queries_logits, mask_labels, class_labels, aux
        )
        torch.manual_seed(5)
        got = ours.criterion(
            ref_out.class_queries_logits, ref_out.masks_queries_logits, mask_labels, class_labels, aux
        )
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6)

    ref_out.loss.backward()
    our_out.loss.backward()
    ref_params = dict(reference.named_parameters())
    our_params = dict(ours.named_parameters())
    # Backbone names differ between the reference versions' module trees and the hub keys
    # (``encoder.swin.embeddings`` vs ``encoder.embeddings``); compare the patch embedding by
    # its mapped name and every other parameter both trees name alike.
    pairs = [
        (
            "model.pixel_level_module.encoder.embeddings.patch_embeddings.projection.weight",
            "model.pixel_level_module.encoder.swin.embeddings.patch_embeddings.projection.weight",
        )
    ]
    pairs += [(name, name) for name in our_params if name in ref_params]
    assert len(pairs) > 100
    for our_name, ref_name in pairs:
        assert our_params[our_name].grad is not None, our_name
        torch.testing.assert_close(
            our_params[our_name].grad, ref_params[ref_name].grad, rtol=1e-4, atol=1e-5, msg=our_name
        )


def test_model_without_targets_has_no_loss(tmp_path) -> None:
    from reference_models import build_reference_mask2former

    from omniseg.models.mask2former import Mask2FormerForUniversalSegmentation

    model = Mask2FormerForUniversalSegmentation.from_pretrained(build_reference_mask2former(tmp_path / "m"))
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))
    assert out.loss is None and out.auxiliary_logits is None


def test_pairwise_costs_equal_their_definitions() -> None:
    from omniseg.models.mask2former.matcher import pairwise_dice, pairwise_sigmoid_bce

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 50, generator=g) * 10  # large logits: the softplus tails matter
    targets = (torch.rand(4, 50, generator=g) > 0.5).float()
    naive_bce = torch.stack([
        torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(q, t) for t in targets])
        for q in logits
    ])
    torch.testing.assert_close(pairwise_sigmoid_bce(logits, targets), naive_bce, rtol=1e-5, atol=1e-5)
    probs = logits.sigmoid()
    naive_dice = 1 - (2 * probs @ targets.T + 1) / (probs.sum(-1)[:, None] + targets.sum(-1)[None] + 1)
    torch.testing.assert_close(pairwise_dice(logits, targets), naive_dice)
