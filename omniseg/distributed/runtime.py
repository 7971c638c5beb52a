"""Ray itself: the optional import, and joining or starting a cluster."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

INSTALL_HINT = "omniseg's Ray engine needs Ray Data: pip install 'omniseg[ray]'"


def require_ray() -> Any:
    """The ``ray`` module with ``ray.data`` loaded.

    Raises:
        ImportError: Ray (with its data extra) is not installed; the message says how to.
    """
    try:
        import ray
        import ray.data  # noqa: F401 - ray[data], not just ray core
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return ray


@contextlib.contextmanager
def ray_cluster(address: str | None) -> Iterator[Any]:
    """Use the Ray instance this process already joined, else join ``address`` (``"auto"``:
    the cluster this machine belongs to; ``HOST:PORT``; ``ray://HOST:PORT``), else start a
    local instance with this machine's CPUs and GPUs. Whatever this call joined or started
    is left (shut down) on exit."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address is None:
        # A private instance for this run; the dashboard needs packages ray[data] lacks.
        ray.init(address="local", include_dashboard=False, **options)
    else:
        ray.init(address=address, **options)
    try:
        yield ray
    finally:
        ray.shutdown()
