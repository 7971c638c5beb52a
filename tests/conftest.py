"""Shared fixtures: the real CamVid data beside the repository, small real photos, and one torch thread."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OMNISEG_SHARED", REPO.parent / "shared"))
CAMVID = SHARED / "datasets" / "camvid"


# Failed checks in the shared parity helpers explain themselves as a test's own asserts do.
pytest.register_assert_rewrite("parity")


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` torch intra-op threads, then restore the previous number."""
    # Imported here: a module-level import would load torch before omniseg can set the
    # OpenMP wait policy (see omniseg/__init__.py).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Tiny models and small tensors run fastest on one thread, far faster on a shared, busy
# machine. A module asks with ``pytestmark = pytest.mark.usefixtures(...)``: per module when
# its module-scoped fixtures (reference models, outputs) should run on one thread too.
@pytest.fixture(scope="module")
def single_thread_per_module() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture
def single_thread_per_test() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    if not (CAMVID / "id2label.json").is_file():
        pytest.skip(f"CamVid not found at {CAMVID} (set OMNISEG_SHARED)")
    return CAMVID


@pytest.fixture(scope="session")
def street_photo_path(camvid_dir: Path) -> Path:
    """A real 480x360 street photo (the first CamVid val frame)."""
    return sorted((camvid_dir / "images" / "val").glob("*.png"))[0]


@pytest.fixture(scope="session")
def street_photo(street_photo_path: Path) -> Image.Image:
    return Image.open(street_photo_path).convert("RGB")


@pytest.fixture(scope="session")
def small_street_photos(camvid_dir: Path) -> list[Image.Image]:
    """Two real photos cropped to different odd sizes, so padding and pixel_mask matter."""
    paths = sorted((camvid_dir / "images" / "val").glob("*.png"))[:2]
    first = Image.open(paths[0]).convert("RGB").crop((17, 9, 17 + 147, 9 + 101))
    second = Image.open(paths[1]).convert("RGB").crop((40, 30, 40 + 121, 30 + 133))
    return [first, second]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def fitted_mask2former_dir(camvid_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny reference Mask2Former fitted for a few steps on CamVid (see fitted_models.py)."""
    from fitted_models import fit_reference_mask2former

    return fit_reference_mask2former(tmp_path_factory.mktemp("fitted-m2f"), camvid_dir)
