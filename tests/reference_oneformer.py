"""Tiny random OneFormer checkpoints built with the reference implementation (transformers).

A helper module for tests, not a test file (as ``reference_maskformer.py`` is for MaskFormer):
each builder writes a complete model directory in the hub layout (weights, config, image
processor, the reference ``OneFormerProcessor``'s settings, a tiny CLIP-style BPE tokenizer
and a class-info file) and returns its path::

    from reference_oneformer import TINY_ONEFORMER_CONFIGS, build_reference_oneformer

    path = build_reference_oneformer(tmp_path / "of", **TINY_ONEFORMER_CONFIGS["prenorm"])

Everything is seeded; every parameter gets seeded Gaussian noise so that parity checks are
sensitive to every weight.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reference_models import label_kwargs, seeded_reference_model, tiny_swin_backbone

# Two tiny shapes that differ in everything a OneFormer implementation can get wrong: Swin
# depths and window (3 does not divide the maps), post- vs pre-norm decoders, widths, heads
# and depths, the task norm on or off, the task length,
# a non-default LayerNorm eps, a checkpoint with the training-only text mapper (saved with
# is_training on, as the hub's are) or without, the tokenizer as vocab.json + merges.txt
# only (the hub's layout) or with tokenizer.json, and the processor's resize.
TINY_ONEFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "small": dict(
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        window_size=4,
        embed_dim=16,
        num_queries=8,
        num_labels=5,
        decoder_layers=3,
        hidden_dim=32,
        conv_dim=32,
        num_attention_heads=2,
        task_seq_len=77,  # the hub layout has no place for another processor length
        with_text_mapper=True,
        tokenizer_json=False,
    ),
    "prenorm": dict(
        depths=(2, 1, 2, 1),
        num_heads=(2, 2, 4, 4),
        window_size=3,
        embed_dim=8,
        num_queries=7,
        num_labels=3,
        decoder_layers=4,
        hidden_dim=64,
        conv_dim=64,
        num_attention_heads=4,
        pre_norm=True,
        use_task_norm=False,
        task_seq_len=12,
        layer_norm_eps=1e-6,
        with_text_mapper=False,
        tokenizer_json=True,
        shortest_edge=72,
        longest_edge=112,
    ),
}

# A CLIP-style byte-level BPE vocabulary just large enough for "the task is {subtask}": the
# lower-case letters alone and as word ends, the merges below, and the special tokens last
# (so that the pad token's id is not 0 and zero padding differs from pad-token padding).
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_MERGES = [
    ("t", "h"), ("th", "e</w>"), ("t", "a"), ("ta", "s"), ("tas", "k</w>"), ("i", "s</w>"),
    ("s", "e"), ("se", "m"), ("a", "n"), ("i", "c</w>"), ("i", "n"), ("p", "an"), ("o", "p"),
]


def write_clip_tokenizer_files(directory: Path) -> None:
    """``vocab.json`` and ``merges.txt`` of the tiny vocabulary (see ``_MERGES``)."""
    tokens = list(_LETTERS) + [c + "</w>" for c in _LETTERS] + ["".join(pair) for pair in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (directory / "merges.txt").write_text(merges, encoding="utf-8")


def reference_oneformer_config(
    *,
    depths: Sequence[int] = (1, 1, 1, 1),
    num_heads: Sequence[int] = (1, 1, 2, 2),
    window_size: int = 4,
    embed_dim: int = 16,
    num_queries: int = 8,
    num_labels: int = 5,
    decoder_layers: int = 3,
    hidden_dim: int = 32,
    conv_dim: int = 32,
    num_attention_heads: int = 2,
    pre_norm: bool = False,
    use_task_norm: bool = True,
    task_seq_len: int = 8,
    layer_norm_eps: float = 1e-5,
    is_training: bool = False,
    id2label: dict[int, str] | None = None,
):
    """A ``transformers.OneFormerConfig`` for a tiny Swin-backed model (dropout off)."""
    from transformers import OneFormerConfig

    return OneFormerConfig(
        backbone_config=tiny_swin_backbone(
            depths=depths, num_heads=num_heads, window_size=window_size, embed_dim=embed_dim
        ),
        num_queries=num_queries,
        hidden_dim=hidden_dim,
        conv_dim=conv_dim,
        mask_dim=conv_dim,
        encoder_layers=2,
        encoder_feedforward_dim=64,
        decoder_layers=decoder_layers,
        dim_feedforward=64,
        num_attention_heads=num_attention_heads,
        query_dec_layers=2,
        pre_norm=pre_norm,
        use_task_norm=use_task_norm,
        task_seq_len=task_seq_len,
        layer_norm_eps=layer_norm_eps,
        text_encoder_width=64,
        text_encoder_num_layers=1,
        text_encoder_context_length=task_seq_len,
        text_encoder_vocab_size=80,
        text_encoder_n_ctx=2,
        dropout=0.0,
        is_training=is_training,
        **label_kwargs(num_labels, id2label),
    )


def save_reference_processor(
    directory: Path,
    *,
    num_labels: int,
    task_seq_length: int,
    shortest_edge: int,
    longest_edge: int,
    tokenizer_json: bool,
) -> None:
    """The reference ``OneFormerProcessor`` (image processor + CLIP tokenizer) in ``directory``,
    with a class-info file (even class ids are things) read from the directory itself; with
    ``tokenizer_json`` in today's reference layout, else in the hub checkpoints'."""
    from transformers import CLIPTokenizer, OneFormerImageProcessor, OneFormerProcessor

    class_info = {str(i): {"name": f"label_{i}", "isthing": int(i % 2 == 0)} for i in range(num_labels)}
    (directory / "class_info.json").write_text(json.dumps(class_info), encoding="utf-8")
    write_clip_tokenizer_files(directory)
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    image_processor = OneFormerImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge},
        ignore_index=255,
        repo_path=str(directory),
        class_info_file="class_info.json",
        num_text=num_labels,
    )
    if tokenizer_json:
        # Today's reference layout: processor_config.json holds the image processor's settings.
        processor = OneFormerProcessor(
            image_processor=image_processor, tokenizer=tokenizer, task_seq_length=task_seq_length
        )
        processor.save_pretrained(directory)
    else:
        # The hub checkpoints' layout: preprocessor_config.json, vocab.json + merges.txt.
        image_processor.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        (directory / "tokenizer.json").unlink()


def build_reference_oneformer(
    directory: str | Path,
    *,
    seed: int = 0,
    perturb: float = 0.1,
    shortest_edge: int = 64,
    longest_edge: int = 96,
    with_text_mapper: bool = False,
    tokenizer_json: bool = False,
    **config_kwargs: Any,
) -> Path:
    """Build a tiny random reference ``OneFormerForUniversalSegmentation`` and save it with its
    processor; ``config_kwargs`` are :func:`reference_oneformer_config`'s. With
    ``with_text_mapper`` the model is built with ``is_training`` on (so the text mapper's
    weights are saved) and the saved config says ``is_training: false``, as the hub's do.
    Returns the directory."""
    from transformers import OneFormerForUniversalSegmentation

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = reference_oneformer_config(is_training=with_text_mapper, **config_kwargs)
    model = seeded_reference_model(OneFormerForUniversalSegmentation, config, seed=seed, perturb=perturb)
    model.save_pretrained(directory)
    if with_text_mapper:
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        config["is_training"] = False
        config_path.write_text(json.dumps(config, indent=2))
    save_reference_processor(
        directory,
        num_labels=len(model.config.id2label),
        task_seq_length=model.config.task_seq_len,
        shortest_edge=shortest_edge,
        longest_edge=longest_edge,
        tokenizer_json=tokenizer_json,
    )
    return directory
