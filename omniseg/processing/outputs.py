"""The dictionary that image processors return."""

from __future__ import annotations

from typing import Any

import torch


class BatchFeature(dict):
    """A ``dict`` of model inputs with attribute access (``inputs.pixel_values``).

    Only model inputs are keys, so ``model(**inputs)`` works. Processors may attach extra,
    non-key information as plain attributes (for example ``original_sizes`` and
    ``resized_sizes``, lists of ``(height, width)``).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchFeature:
        """Move tensors (and tensors in lists) to ``device``; returns ``self``."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
            elif isinstance(value, list):
                self[key] = [v.to(device) if isinstance(v, torch.Tensor) else v for v in value]
        return self
