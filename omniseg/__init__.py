"""omniseg: universal image segmentation.

    seg = omniseg.pipeline("image-segmentation", model="path/or/hub-id")
    results = seg("street.jpg")   # [{"score", "label", "mask"}, ...]
"""

from omniseg import errors
from omniseg.models.auto import load_model, load_processor
from omniseg.pipelines import pipeline

__version__ = "0.1.0"

__all__ = ["errors", "load_model", "load_processor", "pipeline", "__version__"]
