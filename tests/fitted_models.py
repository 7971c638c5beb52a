"""A tiny reference Mask2Former briefly fitted to real street frames.

Random tiny Mask2Formers give every query nearly the same class and mask, so on a real
photo they produce one segment or none: a weak check of a pipeline. Thirty optimiser steps
of the reference's own loss on four CamVid frames are enough for sky, building, road and
the like to come out as separate, confidently classified regions. The weights are ours
(trained here, in the test session) and the fitting uses only the reference package.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reference_models import reference_image_processor, reference_mask2former_config


def fit_reference_mask2former(
    directory: str | Path,
    camvid_dir: Path,
    *,
    steps: int = 30,
    lr: float = 1e-2,
    frames: int = 4,
    seed: int = 0,
) -> Path:
    """Fit a tiny reference Mask2Former on ``frames`` CamVid train frames and save it."""
    from transformers import Mask2FormerForUniversalSegmentation

    directory = Path(directory)
    id2label = {int(k): v for k, v in json.loads((camvid_dir / "id2label.json").read_text()).items()}
    paths = sorted((camvid_dir / "images" / "train").glob("*.png"))[:frames]
    size = (96, 72)
    images = [Image.open(p).convert("RGB").resize(size, Image.BILINEAR) for p in paths]
    labels = [
        np.array(Image.open(camvid_dir / "labels" / "train" / p.name).resize(size, Image.NEAREST))
        for p in paths
    ]

    torch.manual_seed(seed)
    config = reference_mask2former_config(num_labels=len(id2label), num_queries=12)
    config.id2label = id2label
    config.label2id = {name: idx for idx, name in id2label.items()}
    config.train_num_points = 1024
    model = Mask2FormerForUniversalSegmentation(config)
    processor = reference_image_processor(shortest_edge=64, longest_edge=96)
    processor.ignore_index = 11  # CamVid's "unlabelled"
    batch = processor(images=images, segmentation_maps=labels, return_tensors="pt")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and steadier on a busy machine
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            loss = model(
                pixel_values=batch["pixel_values"],
                pixel_mask=batch["pixel_mask"],
                mask_labels=batch["mask_labels"],
                class_labels=batch["class_labels"],
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
