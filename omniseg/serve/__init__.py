"""The web service (``omniseg serve``, the ``serve`` extra): an HTTP API and a page.

    from omniseg.serve import ModelRegistry, create_app
    app = create_app(ModelRegistry.load(["path/to/model"], max_pixels=40_000_000))
"""

from omniseg.serve.app import create_app
from omniseg.serve.registry import ModelRegistry

__all__ = ["ModelRegistry", "create_app"]
