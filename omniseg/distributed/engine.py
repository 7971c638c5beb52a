"""``omniseg segment --engine ray``: the command's images segmented and written by Ray actors.

The driver (the ``omniseg segment`` process) plans the job as the local engine does: which
inputs, which output stem each gets, which are already done. The pending images then go
through a Ray Data dataset of ``{index, source, stem}`` rows, streamed to a pool of actors
that each load the model once, read their images (local paths, or any pyarrow filesystem),
segment them with the pipeline and write each image's files with the local engine's writer
(:func:`omniseg.io.results.write_image_results`, atomic, JSON last). Only a small status row
per image comes back, for the progress bar and ``errors.jsonl``.

On a cluster of several machines, ``--out`` (and local inputs and ``--model``) must be paths
that every node sees (a shared filesystem), and omniseg must be installed on every node.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from omniseg.distributed.dataset import OutputFiles, map_with_actors
from omniseg.distributed.runtime import ray_cluster
from omniseg.distributed.sources import is_uri

ENGINES = ("local", "ray")

# Blocks of the plan: each is one unit of work handed to an actor; about one batch each,
# but no more than this many, so that a run over millions of images stays light to plan.
MAX_BLOCKS = 10_000

# errors.jsonl's "error" for an image whose batch Ray gave up on (the actor call raised).
LOST_ERROR = "RayTaskError"


def usage_problem(args: argparse.Namespace) -> str | None:
    """Why these arguments cannot run, or None."""
    uris = [text for text in args.inputs if is_uri(text)]
    if args.engine == "local":
        if uris:
            return f"{uris[0]}: inputs of a remote filesystem need --engine ray"
        return None
    from omniseg.distributed.runtime import INSTALL_HINT

    try:
        import ray.data  # noqa: F401
    except ImportError:
        return f"--engine ray: {INSTALL_HINT}"
    if args.device != "cpu":
        return "--engine ray: the actors' device comes from --gpus-per-actor, not --device"
    if args.quantize and args.gpus_per_actor > 0:
        return f"--quantize {args.quantize} runs on the CPU: not with --gpus-per-actor"
    return None


def segment_items(
    items: Sequence[Any],
    *,
    model: str | None,
    model_name: str,
    task: str,
    formats: Sequence[str],
    call_options: Mapping[str, Any],
    address: str | None,
    actors: int,
    batch_size: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    quantize: str | None = None,
    mask_generation: Mapping[str, Any] | None = None,
) -> Iterator[tuple[Any, tuple[str, str] | None]]:
    """Segment and write ``items`` (each with ``.path`` and ``.stem``) on Ray.

    ``model``: what each actor loads (``None``: the bundled default model); ``model_name``:
    the name recorded in each JSON (the bundled model's is ``default``, which is no path or
    hub id to load). ``task``: as the user gave it (``None``: what the model supports
    first); each actor resolves it as the local engine does. ``quantize`` and
    ``mask_generation``: see :func:`map_with_actors`.

    Yields ``(item, None)`` when an image's files are written, ``(item, (error type,
    reason))`` when it failed; each item exactly once, in the order they finish.
    """
    if not items:
        return
    plan = [
        {
            "index": index,
            "source": str(item.path),  # as the user named it: in the JSONs and errors
            # What the actors read: an absolute path, since their working folder is the one
            # the Ray instance started in (--ray-address auto), not the user's.
            "path": item.path if isinstance(item.path, str) else os.path.abspath(item.path),
            "stem": os.path.abspath(item.stem),
        }
        for index, item in enumerate(items)
    ]
    with ray_cluster(address) as ray, _quiet_ray_data_logs():
        context = ray.data.DataContext.get_current()
        saved = (context.enable_progress_bars, context.print_on_execution_start, context.max_errored_blocks)
        # omniseg's own bar counts images; a batch that fails on every try is reported as
        # lost images below instead of ending the run.
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        context.max_errored_blocks = -1
        try:
            blocks = min(MAX_BLOCKS, math.ceil(len(plan) / batch_size))
            ds = ray.data.from_items(plan, override_num_blocks=blocks)
            ds = map_with_actors(
                ds,
                model=model,
                task=task,
                image_column="path",
                source_column="source",
                call_options=call_options,
                batch_size=batch_size,
                actors=min(actors, blocks),  # more actors than batches would idle
                cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor,
                quantize=quantize,
                output_files=OutputFiles(formats=tuple(formats), model_name=model_name),
                mask_generation=mask_generation,
            )
            reported: set[int] = set()
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = zip(*(batch[name].to_pylist() for name in ("index", "error_type", "error")))
                for index, error_type, reason in rows:
                    # A retried batch may repeat rows an earlier try had already returned.
                    if index in reported:
                        continue
                    reported.add(index)
                    yield items[index], None if error_type is None else (error_type, reason)
        finally:
            context.enable_progress_bars, context.print_on_execution_start, context.max_errored_blocks = saved
    for index, item in enumerate(items):
        if index not in reported:
            yield item, (LOST_ERROR, "its batch failed in Ray and was given up; see the Ray logs")


@contextlib.contextmanager
def _quiet_ray_data_logs() -> Iterator[None]:
    """Ray Data's per-run INFO lines, and its note that we turned its progress bars off,
    would interleave with omniseg's progress bar; its warnings and errors still show."""
    logger = logging.getLogger("ray.data")
    level = logger.level

    def drop_progress_note(record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()

    handlers = logging.getLogger("ray").handlers + logger.handlers
    logger.setLevel(logging.WARNING)
    for handler in handlers:
        handler.addFilter(drop_progress_note)
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler in handlers:
            handler.removeFilter(drop_progress_note)
