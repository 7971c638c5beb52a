"""SAM model against the reference implementation on tiny random checkpoints.

Image embeddings and mask logits within 1e-4 (relative to the largest magnitude), IoU
scores within 1e-5, for point, box, point+box and mask prompts, single- and multi-mask;
and a model saved by omniseg loads in the reference with the same outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reference_sam import TINY_SAM_CONFIGS, build_reference_sam

transformers = pytest.importorskip("transformers")

from omniseg import load_model  # noqa: E402
from omniseg.models.sam import SamModel  # noqa: E402


pytestmark = pytest.mark.usefixtures("single_thread_per_test")


@pytest.fixture(scope="module", params=sorted(TINY_SAM_CONFIGS))
def sam_pair(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module, SamModel]:
    settings = TINY_SAM_CONFIGS[request.param]
    directory = build_reference_sam(tmp_path_factory.mktemp(f"sam-{request.param}"), **settings)
    reference = transformers.SamModel.from_pretrained(directory).eval()
    return request.param, directory, reference, load_model(directory)


def _relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return float((expected - actual).abs().max() / expected.abs().max())


def _prompts(size: int, grid: int) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    points = torch.rand(2, 5, 3, 2, generator=generator) * size
    labels = torch.randint(-1, 2, (2, 5, 3), generator=generator)
    labels[:, :, 0] = 1
    labels[0, 0, 2] = -10  # padding
    corners = torch.rand(2, 5, 2, 2, generator=generator) * size
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)
    masks = torch.randn(2, 1, 4 * grid, 4 * grid, generator=generator)
    return {
        "points": dict(input_points=points, input_labels=labels),
        "boxes": dict(input_boxes=boxes),
        "points+boxes": dict(input_points=points, input_labels=labels, input_boxes=boxes),
        "points+mask": dict(input_points=points, input_labels=labels, input_masks=masks),
    }


@torch.no_grad()
def test_image_embeddings_match_reference(sam_pair) -> None:
    name, _, reference, ours = sam_pair
    size = TINY_SAM_CONFIGS[name]["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = reference.get_image_embeddings(pixels)
    actual = ours.get_image_embeddings(pixels)
    assert actual.shape == expected.shape
    assert _relative_error(expected, actual) < 1e-4


@pytest.mark.parametrize("prompt", ["points", "boxes", "points+boxes", "points+mask"])
@pytest.mark.parametrize("multimask_output", [True, False])
@torch.no_grad()
def test_masks_and_iou_scores_match_reference(sam_pair, prompt, multimask_output) -> None:
    name, _, reference, ours = sam_pair
    settings = TINY_SAM_CONFIGS[name]
    size = settings["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = _prompts(size, size // settings["patch_size"])[prompt]
    expected = reference(pixel_values=pixels, multimask_output=multimask_output, **inputs)
    actual = ours(pixel_values=pixels, multimask_output=multimask_output, **inputs)
    assert actual.pred_masks.shape == expected.pred_masks.shape
    assert _relative_error(expected.pred_masks, actual.pred_masks) < 1e-4
    assert float((expected.iou_scores - actual.iou_scores).abs().max()) < 1e-5


@torch.no_grad()
def test_stored_image_embeddings_give_the_same_masks(sam_pair) -> None:
    name, _, _, ours = sam_pair
    size = TINY_SAM_CONFIGS[name]["image_size"]
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    points = torch.tensor([[[[size / 3, size / 2]]]])
    direct = ours(pixel_values=pixels, input_points=points)
    embeddings = ours.get_image_embeddings(pixels)
    reused = ours(image_embeddings=embeddings, input_points=points)
    torch.testing.assert_close(reused.pred_masks, direct.pred_masks, rtol=0, atol=0)


@torch.no_grad()
def test_model_saved_by_omniseg_loads_in_reference(sam_pair, tmp_path) -> None:
    name, _, reference, ours = sam_pair
    ours.save_pretrained(tmp_path)
    reloaded = transformers.SamModel.from_pretrained(tmp_path).eval()
    size = TINY_SAM_CONFIGS[name]["image_size"]
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    points = torch.tensor([[[[size / 4, size / 5]], [[size / 2, size / 2]]]])
    expected = reference(pixel_values=pixels, input_points=points)
    actual = reloaded(pixel_values=pixels, input_points=points)
    torch.testing.assert_close(actual.pred_masks, expected.pred_masks, rtol=0, atol=0)
    torch.testing.assert_close(actual.iou_scores, expected.iou_scores, rtol=0, atol=0)
    # And back: the saved directory loads in omniseg with the same config.
    again = SamModel.from_pretrained(tmp_path)
    assert again.config.to_dict() == ours.config.to_dict()


def test_checkpoint_with_the_tied_copy_loads(sam_pair, tmp_path) -> None:
    """Hub checkpoints store the prompt encoder's tied Fourier matrix a second time."""
    from safetensors.torch import load_file, save_file

    _, directory, _, ours = sam_pair
    state = load_file(str(directory / "model.safetensors"))
    state["prompt_encoder.shared_embedding.positional_embedding"] = state[
        "shared_image_embedding.positional_embedding"
    ].clone()
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = SamModel.from_pretrained(tmp_path)
    torch.testing.assert_close(
        loaded.shared_image_embedding.positional_embedding, ours.shared_image_embedding.positional_embedding
    )


@torch.no_grad()
def test_processor_outputs_go_straight_into_the_model(sam_pair, street_photo) -> None:
    from omniseg import load_processor

    _, directory, reference, ours = sam_pair
    processor = load_processor(directory)
    inputs = processor(street_photo, input_points=[[[[120.0, 80.0]]]], input_boxes=[[[50.0, 40.0, 300.0, 200.0]]])
    expected = reference(**{k: v for k, v in inputs.items() if k not in ("original_sizes", "reshaped_input_sizes")})
    actual = ours(**inputs)
    assert _relative_error(expected.pred_masks, actual.pred_masks) < 1e-4
    masks = processor.post_process_masks(actual.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert masks[0].shape == (1, 3, street_photo.height, street_photo.width)


@torch.no_grad()
def test_global_attention_in_query_blocks_matches_reference(sam_pair, monkeypatch) -> None:
    """Global layers attend in blocks of grid rows; blocks of one or two rows give the
    reference's embeddings too."""
    from omniseg.models.sam import vision_encoder

    name, _, reference, ours = sam_pair
    monkeypatch.setattr(vision_encoder, "QUERY_BLOCK", 20)
    size = TINY_SAM_CONFIGS[name]["image_size"]
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(4))
    assert _relative_error(reference.get_image_embeddings(pixels), ours.get_image_embeddings(pixels)) < 1e-4


@torch.no_grad()
def test_folded_decoder_attention_matches_plain_attention(sam_pair, monkeypatch) -> None:
    """The decoder's attention between a prompt's few tokens and its own image tokens moves
    the projections to the few tokens' side; the plain path gives the same masks."""
    from omniseg.models.sam.mask_decoder import SamAttention

    name, _, _, ours = sam_pair
    size = TINY_SAM_CONFIGS[name]["image_size"]
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(5))
    points = torch.tensor([[[[size / 4, size / 5]], [[size / 2, size / 3]]]])
    calls = []
    for method in ("_few_queries", "_few_keys"):
        original = getattr(SamAttention, method)

        def counted(self, *args, _original=original, _name=method):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(SamAttention, method, counted)
    folded = ours(pixel_values=pixels, input_points=points)
    assert "_few_queries" in calls and "_few_keys" in calls
    monkeypatch.setattr(SamAttention, "_few_queries", lambda self, *a: pytest.fail("folded path taken"))
    monkeypatch.setattr(SamAttention, "_few_keys", lambda self, *a: pytest.fail("folded path taken"))
    monkeypatch.setattr(SamAttention, "forward", _plain_attention)
    plain = ours(pixel_values=pixels, input_points=points)
    assert _relative_error(plain.pred_masks, folded.pred_masks) < 1e-5
    torch.testing.assert_close(folded.iou_scores, plain.iou_scores, rtol=1e-5, atol=1e-6)


def _plain_attention(self, query, key, value):
    prompts = max(query.shape[1], key.shape[1], value.shape[1])
    q = self._heads(self.q_proj(query), prompts)
    k = self._heads(self.k_proj(key), prompts)
    v = self._heads(self.v_proj(value), prompts)
    attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
    return self.out_proj(attended.transpose(2, 3).flatten(3))


def test_a_forward_outside_no_grad_gives_the_same_masks_and_a_gradient(sam_pair, street_photo, monkeypatch) -> None:
    """``outputs = model(**inputs)`` as the README writes it, with autograd recording: the
    global layers' relative-position bias used to be written with ``out=`` into a shared
    buffer, which autograd refuses ("add(): functions with out=... arguments don't support
    automatic differentiation"). Blocks of two grid rows, so the bias has several blocks."""
    from omniseg import load_processor
    from omniseg.models.sam import vision_encoder

    _, directory, _, ours = sam_pair
    monkeypatch.setattr(vision_encoder, "QUERY_BLOCK", 20)
    inputs = load_processor(directory)(street_photo, input_points=[[[[120.0, 80.0]]]])
    with torch.no_grad():
        expected = ours(**inputs)
    actual = ours(**inputs)
    assert actual.pred_masks.requires_grad
    # Recording autograd, PyTorch may pick other attention kernels: equal to float rounding.
    assert _relative_error(expected.pred_masks, actual.pred_masks.detach()) < 1e-5
    assert _relative_error(expected.iou_scores, actual.iou_scores.detach()) < 1e-5
    actual.pred_masks.sum().backward()
    grads = [p.grad for p in ours.vision_encoder.parameters() if p.grad is not None]
    ours.zero_grad(set_to_none=True)
    assert grads and all(torch.isfinite(g).all() for g in grads)
