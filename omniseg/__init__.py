"""omniseg: universal image segmentation.

    seg = omniseg.pipeline("image-segmentation", model="path/or/hub-id")
    results = seg("street.jpg")   # [{"score", "label", "mask"}, ...]
"""

import os

# PyTorch's OpenMP threads spin while they wait for work (GNU OpenMP's default policy). When
# another process holds one of the cores, every parallel region then waits for the thread
# that lost its core: the bundled model took 0.5-3 s per frame at 2 threads instead of
# 0.17-0.3 s (2-core machine, other processes busy). Sleeping waiters avoid that. OpenMP
# reads the variable when it starts, so this takes effect when omniseg is imported before
# torch (the command line always is); a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from omniseg import errors  # noqa: E402
from omniseg.models.auto import load_model, load_processor  # noqa: E402
from omniseg.pipelines import pipeline  # noqa: E402

__version__ = "0.1.0"

__all__ = ["errors", "load_model", "load_processor", "pipeline", "__version__"]
