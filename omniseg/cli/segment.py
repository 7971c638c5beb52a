"""``omniseg segment``: segment images and folders of images, writing results per image."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from omniseg.assets import DEFAULT_MODEL_NAME
from omniseg.cli import argtypes
from omniseg.errors import InputError, ModelNotFoundError, OmnisegError, failure_reason
from omniseg.io.atomic import atomic_write_text
from omniseg.io.images import iter_image_files, load_image
from omniseg.io.results import (
    IMAGE_OUTPUTS,
    answer_options,
    coco_document,
    output_paths,
    read_image_results,
    write_coco,
    write_image_results,
)

FORMATS = ("png", "json", "coco")
ERRORS_FILE = "errors.jsonl"
COCO_FILE = "coco_results.json"
TASKS = ("auto", "semantic", "instance", "panoptic", "everything")

DESCRIPTION = "Segment images (files or whole folders) and write the results per image."
EPILOG = f"""\
outputs, per input image: a file given by path writes straight into OUT (OUT/STEM.json);
a folder's images keep their layout inside that folder (DIR/sub/a.png -> OUT/sub/a.json):
  STEM.json          image path, size, task, model, options (--threshold / --tta if
                     given), and per segment: id, label_id, label, score (null for
                     semantic), area, bbox [x, y, w, h], COCO RLE mask
  STEM_labels.png    class id per pixel; 8-bit if all class ids < 255, else 16-bit;
                     pixels no segment covers are 255 (8-bit) or 65535 (16-bit)
  STEM_overlay.png   the image with the segments blended in, outlined, and a legend
  Name clashes (a.jpg and a.png, or x/a.png and y/a.png given as files): each of the
  inputs uses its full name (a.jpg.json, a.png.json); where that is taken too, the later
  input in argument order adds a number (a.png-2.json).

--format (comma-separated, default png,json):
  png    label map and overlay          json   the per-image JSON
  coco   also OUT/{COCO_FILE}: every image's segments in one COCO-format file
         (images, categories = the model's id2label, annotations with RLE masks, bbox,
         area, score), loadable by pycocotools.coco.COCO; implies json, from which it
         is rebuilt on re-runs

Re-running with the same OUT skips images whose outputs all exist and whose JSON names
the same model, task and options (the JSON is written last, atomically, so a finished
image is never half written); other images are (re)done. A file that cannot be read
or segmented does not stop the batch: it is listed in OUT/{ERRORS_FILE} (one JSON line
per file: {{"file", "error", "reason"}}; rewritten by each run).

Segment Anything models (--task everything, the default for them, or --points / --box): STEM.json lists the
masks (label mask_N, numbered by decreasing score; score = predicted IoU; COCO RLE),
STEM_labels.png holds the mask number per pixel, the overlay one colour per mask.
  --task everything   every mask in the image (the mask-generation pipeline; --threshold
                      is its minimum predicted IoU, default 0.88)
  --points "x,y;x,y"  the three candidate masks of one prompt of these points (pixels of
  --box x0,y0,x1,y1   the original image; points and box may be combined)

exit status: 0 all images done, 1 some input failed, 2 usage error (bad arguments,
no model, model cannot be loaded).
"""


@dataclass(frozen=True)
class _Item:
    """One input image: the path as the user will recognise it, and its output stem."""

    path: Path | str  # str: a URI (s3://...), read by the Ray engine
    stem: Path  # OUT/<relative folders>/<stem>, without suffix


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "segment",
        help="segment images and folders, writing JSON, label maps and overlays",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS",
                        help="image files, or folders to walk (recursively) for images; with "
                             "--engine ray also URIs of any filesystem pyarrow supports (s3://...)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder (created if needed)")
    parser.add_argument("--model", metavar="M",
                        help="model directory or hub id (required unless a default model is bundled)")
    parser.add_argument("--task", choices=TASKS, default="auto",
                        help="subtask; auto = panoptic, else instance, else semantic, "
                             "by what the model supports, everything for a Segment Anything "
                             "model (default: auto); everything = all masks of a Segment "
                             "Anything model")
    parser.add_argument("--points", type=_sam_points, metavar='"x,y;x,y"',
                        help="Segment Anything: masks for one prompt of these points (foreground)")
    parser.add_argument("--box", type=_sam_box, metavar="x0,y0,x1,y1",
                        help="Segment Anything: masks for this box (with --points: both)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time flip (semantic only): average the class scores of each image and its "
                             "mirror image; two forward passes per image")
    parser.add_argument("--threshold", type=argtypes.number(minimum=0, maximum=1), metavar="F",
                        help="minimum score of a kept segment, instance/panoptic "
                             "(default: the pipeline's, 0.9)")
    parser.add_argument("--quantize", choices=("int8",),
                        help="the opt-in fast CPU mode: int8 linear layers (1.4-1.8x the float32 speed on "
                             "Swin-T-sized models; answers change slightly; see the README's Speed)")
    parser.add_argument("--batch-size", type=argtypes.integer(minimum=1), default=1, metavar="N",
                        help="images read and segmented together (default: 1); on CUDA those of equal "
                             "processed size share a forward pass, the CPU runs each image alone")
    parser.add_argument("--device", type=argtypes.device, default="cpu", metavar="{cpu,cuda}",
                        help="where the model runs: cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--format", type=_formats, default=("png", "json"), metavar="png,json,coco",
                        help="outputs to write, comma-separated (default: png,json); see below")
    parser.add_argument("--no-overlay", action="store_true",
                        help="png writes the label map only, not the (costly) overlay picture")
    _add_engine_arguments(parser)
    parser.set_defaults(_segment_parser=parser)
    return parser


def run(args: argparse.Namespace) -> int:
    formats: tuple[str, ...] = args.format if isinstance(args.format, tuple) else _formats(args.format)
    if args.no_overlay:
        formats = tuple("labels" if name == "png" else name for name in formats)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _usage_error(args, f"--out {out} exists and is not a folder")
    problem = argtypes.output_folder_problem(out)
    if problem is not None:
        return _usage_error(args, problem)
    from omniseg.distributed import engine as ray_engine  # imports Ray only when used

    problem = ray_engine.usage_problem(args)
    if problem is not None:
        return _usage_error(args, problem)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return _usage_error(args, f"--device {args.device}: CUDA is not available on this machine")

    # Listed before the model loads: inputs with no image at all (an empty or mistyped
    # folder) are a usage error, not a run that "succeeds" having done nothing.
    items = _collect(args.inputs, out)
    if not items:
        return _usage_error(
            args, f"no image files found in {' '.join(args.inputs)} (folders are searched, "
            f"subfolders too, for image file names: .jpg, .png, .tif, .bmp, .webp, ...)"
        )

    if not (args.points or args.box) and _is_segment_anything(args.model):
        # A Segment Anything model has one promptless task: "auto" (the default, "what the
        # model supports") is every mask of each image; a subtask with classes cannot be.
        if args.task not in ("auto", "everything"):
            return _usage_error(
                args, f"--task {args.task}: {args.model} is a Segment Anything model, which gives masks "
                "without classes; use --task everything (every mask of each image) or --points / --box "
                "(the masks of one prompt)"
            )
        args.task = "everything"

    seg = _load_pipeline(args)
    if isinstance(seg, int):
        return seg
    subtask = None if args.task == "auto" else args.task
    try:
        task = seg.resolve_subtask(subtask)
    except ValueError as exc:
        return _usage_error(args, f"--task {args.task}: {exc}")
    if args.tta:
        try:
            seg.check_tta(task)
        except (AttributeError, ValueError) as exc:
            reason = exc if isinstance(exc, ValueError) else "it is not offered for Segment Anything models"
            return _usage_error(args, f"--tta: {reason}")
    id2label = seg.id2label

    errors_path = out / ERRORS_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        errors_path.unlink(missing_ok=True)  # it describes the latest run only
    except OSError as exc:  # output_folder_problem passed, yet the filesystem refused
        return _usage_error(args, f"--out {out}: cannot write there: {exc.strerror or exc}")
    errors: list[dict[str, str]] = []

    # The bundled model is recorded by the name the web service gives it, so a result file
    # always says which model made it.
    model_name = DEFAULT_MODEL_NAME if args.model is None else str(args.model)
    call_options: dict[str, Any] = {"subtask": subtask, "batch_size": args.batch_size}
    if args.threshold is not None:
        call_options["threshold"] = args.threshold
    if args.tta:
        call_options["tta"] = True
    options = answer_options({**call_options, "quantize": args.quantize})
    pending = [item for item in items if not _is_done(item, formats, model_name, task, options)]
    skipped = len(items) - len(pending)

    progress = tqdm(
        total=len(items),
        desc="segment",
        unit="image",
        file=sys.stderr,
        dynamic_ncols=True,
        # Without a terminal (logs, CI) redraws become lines: keep them rare.
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )
    progress.set_postfix(failed=0, skipped=skipped, refresh=False)
    progress.update(skipped)

    def advance() -> None:
        """One more image handled: the counts shown are always those of the final summary."""
        progress.set_postfix(failed=len(errors), skipped=skipped, refresh=False)
        progress.update(1)

    def record_failure(item: _Item, error: str, reason: str) -> None:
        errors.append({"file": str(item.path), "error": error, "reason": reason})
        # Rewritten whole, atomically, after every failure: always a complete file.
        atomic_write_text(errors_path, "".join(json.dumps(e) + "\n" for e in errors))
        progress.write(f"omniseg segment: {item.path}: {error}: {reason}", file=sys.stderr)

    def fail(item: _Item, exc: BaseException) -> None:
        record_failure(item, type(exc).__name__, failure_reason(exc))

    try:
        if args.engine == "ray":
            from omniseg.cli.segment_everything import MaskSegmenter

            outcomes = ray_engine.segment_items(
                pending, model=args.model, model_name=model_name, task=subtask, formats=formats,
                call_options=call_options, address=args.ray_address, actors=args.actors,
                batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
                gpus_per_actor=args.gpus_per_actor, quantize=args.quantize,
                mask_generation={"points": seg.points, "box": seg.box} if isinstance(seg, MaskSegmenter) else None,
            )
            for item, failure in outcomes:
                if failure is not None:
                    record_failure(item, *failure)
                advance()
        else:
            for start in range(0, len(pending), args.batch_size):
                batch = pending[start : start + args.batch_size]
                loaded = []
                for item in batch:
                    try:
                        loaded.append((item, load_image(item.path)))
                    except InputError as exc:
                        fail(item, exc)
                        advance()
                for (item, image), segments in _segment(seg, loaded, call_options, fail):
                    if segments is not None:
                        try:
                            write_image_results(
                                item.stem, image, segments, id2label, source=item.path,
                                task=task, model=model_name, formats=formats, options=options,
                            )
                        except (OSError, ValueError) as exc:
                            fail(item, exc)
                    advance()
    finally:
        progress.close()

    if "coco" in formats:
        _write_coco(out, items, formats, id2label)
    done = len(pending) - len(errors)
    summary = f"omniseg segment: {done} segmented, {skipped} already done, {len(errors)} failed"
    if errors:
        summary += f" (see {errors_path})"
    print(summary, file=sys.stderr)
    return 1 if errors else 0


# --- steps ---------------------------------------------------------------------------------


def _is_segment_anything(model: str | None) -> bool:
    """Whether ``--model`` names a Segment Anything checkpoint (``False`` when it cannot be
    told: loading the model then reports the problem)."""
    if model is None:
        return False
    from omniseg.hub import resolve_model_dir
    from omniseg.models.auto import model_type_of

    try:
        return model_type_of(resolve_model_dir(model)) == "sam"
    except OmnisegError:
        return False


def _load_pipeline(args: argparse.Namespace):
    """The pipeline, or an exit status when the model is missing or unusable."""
    import omniseg

    if getattr(args, "task", None) == "everything" or getattr(args, "points", None) or getattr(args, "box", None):
        if args.quantize:
            return _usage_error(
                args, f"--quantize {args.quantize} applies to image-segmentation models "
                "(Mask2Former, SegFormer, ...), not to Segment Anything"
            )
        return _load_mask_segmenter(args)
    try:
        return omniseg.pipeline("image-segmentation", model=args.model, device=args.device, quantize=args.quantize)
    except ModelNotFoundError as exc:
        if args.model is None:
            return _usage_error(
                args, "no --model given and no default model is bundled; pass --model "
                "with a checkpoint directory or hub id"
            )
        return _usage_error(args, f"--model: {exc}")
    except ValueError as exc:
        if args.quantize and "quantize" in str(exc):
            return _usage_error(args, f"--quantize {args.quantize}: {exc}")
        return _usage_error(args, f"--model {args.model}: cannot load the model: {exc}")
    except (OmnisegError, OSError) as exc:
        return _usage_error(args, f"--model {args.model}: cannot load the model: {exc}")


def _load_mask_segmenter(args: argparse.Namespace):
    """The Segment Anything segmenter, or an exit status (see _load_pipeline)."""
    from omniseg.cli.segment_everything import MaskSegmenter

    if args.model is None:
        return _usage_error(args, "--task everything / --points / --box need --model with a Segment Anything checkpoint")
    if args.task not in ("auto", "everything"):
        return _usage_error(args, f"--points / --box give Segment Anything masks; --task {args.task} does not apply")
    if args.task == "everything" and (args.points or args.box):
        # Both asked for: the prompt used to win in silence, every mask never being made.
        return _usage_error(
            args, "--task everything gives every mask of an image, --points / --box the masks of "
            "one prompt: pass one or the other"
        )
    try:
        return MaskSegmenter(args.model, device=args.device, points=args.points, box=args.box)
    except (OmnisegError, OSError, ValueError) as exc:
        return _usage_error(args, f"--model {args.model}: cannot load the model: {exc}")


def _segment(seg, loaded: list, options: dict[str, Any], fail):
    """Yield ``((item, image), segments or None)``: a batch at once, else image by image.

    If the batch call fails, each image is retried alone so that one image the model
    cannot handle costs only that image; its error is recorded with ``fail``.
    """
    if not loaded:
        return
    try:
        answers = seg([image for _, image in loaded], **options)
    except Exception:  # noqa: BLE001 - isolated and recorded per image below
        answers = None
    if answers is not None:
        yield from zip(loaded, answers)
        return
    for pair in loaded:
        try:
            segments = seg([pair[1]], **options)[0]
        except Exception as exc:  # noqa: BLE001 - recorded in errors.jsonl and exit status
            fail(pair[0], exc)
            segments = None
        yield pair, segments


def _collect(inputs: Sequence[str], out: Path) -> list[_Item]:
    """Input files in order, each with its output stem under ``out``.

    A file argument's outputs go directly into ``out`` (``out/STEM``); a folder argument's
    files keep their layout inside that folder (``out/sub/dir/STEM``). When two inputs would
    share an output stem (``a.jpg`` and ``a.png``, or ``x/a.png`` and ``y/a.png`` given as
    files), each of them uses its full file name instead (``a.jpg.json``, ``a.png.json``), and
    a later one in argument order whose full name is taken too adds a number (``a.png-2.json``).
    URIs of other filesystems (``s3://...``; the Ray engine reads them) are laid out alike.
    """
    from omniseg.distributed.sources import is_uri, list_image_uris

    out_abs = Path(os.path.abspath(out))
    output_suffixes = tuple(s for s in IMAGE_OUTPUTS.values() if s.endswith(".png"))
    found: list[tuple[Path | str, Path]] = []  # (file or URI, its path relative to OUT)
    for arg in inputs:
        if is_uri(arg):  # a remote file or folder (s3://...), for the Ray engine
            found.extend((uri, Path(relative)) for uri, relative in list_image_uris(arg))
            continue
        path = Path(arg)
        if path.is_dir():
            for file in iter_image_files([path]):
                # Never take our own pictures for inputs when OUT lies inside a walked folder.
                if Path(os.path.abspath(file)).is_relative_to(out_abs) and file.name.endswith(output_suffixes):
                    continue
                found.append((file, file.relative_to(path)))
        else:
            found.append((path, Path(path.name)))

    unique: dict[Path | str, tuple[Path | str, Path]] = {}
    for file, rel in found:
        unique.setdefault(file if isinstance(file, str) else Path(os.path.abspath(file)), (file, rel))
    planned = list(unique.values())

    reserved = {Path(Path(COCO_FILE).stem)}  # OUT's own files
    claims: dict[Path, int] = {}
    for _, rel in planned:
        claims[rel.with_suffix("")] = claims.get(rel.with_suffix(""), 0) + 1
    taken = set(reserved)
    items = []
    for file, rel in planned:
        stem = rel.with_suffix("")
        if claims[stem] > 1 or stem in reserved:
            stem, number = rel, 2
            while stem in taken or (stem != rel and stem in claims):
                stem = rel.with_name(f"{rel.name}-{number}")
                number += 1
        taken.add(stem)
        items.append(_Item(path=file, stem=out / stem))
    return items


def _is_done(item: _Item, formats: Sequence[str], model: str | None, task: str, options: dict[str, Any]) -> bool:
    """All outputs exist, and the JSON (when there is one) came from this model, task and
    answer options (``--threshold``, ``--tta``).

    The check keeps a re-run with another model, task or threshold in the same OUT from
    silently keeping the old answers; an unreadable JSON, or one from before options were
    recorded, means the image is redone.
    """
    paths = output_paths(item.stem, formats)
    if not all(path.is_file() for path in paths.values()):
        return False
    if "json" not in paths:
        return True
    try:
        document = read_image_results(paths["json"])
    except (OSError, ValueError):
        return False
    return document.get("model") == model and document.get("task") == task and document.get("options") == options


def _write_coco(out: Path, items: list[_Item], formats: Sequence[str], id2label) -> None:
    """Gather every finished image's JSON (this run's and earlier runs') into one COCO file."""
    documents, names = [], []
    for item in items:
        json_path = output_paths(item.stem, formats)["json"]
        if json_path.is_file():
            documents.append(read_image_results(json_path))
            names.append(str(item.path))
    write_coco(out / COCO_FILE, coco_document(documents, id2label, file_names=names))


# --- argument types and usage errors --------------------------------------------------------


def _usage_error(args: argparse.Namespace, message: str) -> int:
    parser = getattr(args, "_segment_parser", None)
    if parser is not None:
        parser.print_usage(sys.stderr)
        prog = parser.prog
    else:
        prog = "omniseg segment"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _formats(text: str) -> tuple[str, ...]:
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown format {', '.join(unknown) or repr(text)}; choose from {','.join(FORMATS)}"
        )
    if "coco" in names and "json" not in names:
        names.append("json")  # the COCO file is built from the per-image JSONs
    return tuple(dict.fromkeys(names))


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    from omniseg.distributed.engine import ENGINES

    group = parser.add_argument_group("engine")
    group.add_argument("--engine", choices=ENGINES, default="local",
                       help="local: this process (default); ray: an actor pool on a Ray cluster, "
                            "each actor holding the model (needs: pip install 'omniseg[ray]')")
    group.add_argument("--ray-address", metavar="auto|HOST",
                       help="Ray cluster to join (auto: the one this machine is part of; HOST:PORT; "
                            "ray://HOST:PORT); default: start a local Ray instance")
    group.add_argument("--actors", type=argtypes.integer(minimum=1), default=1, metavar="N",
                       help="Ray actors, each with one copy of the model (default: 1)")
    group.add_argument("--cpus-per-actor", type=argtypes.number(above=0), default=1.0, metavar="C",
                       help="CPUs Ray reserves per actor, also its PyTorch threads (default: 1)")
    group.add_argument("--gpus-per-actor", type=argtypes.number(minimum=0), default=0.0, metavar="G",
                       help="GPUs per actor; above 0 the model runs on CUDA (default: 0)")


def _sam_points(text: str) -> list[list[float]]:
    from omniseg.cli.segment_everything import parse_points

    return parse_points(text)


def _sam_box(text: str) -> list[float]:
    from omniseg.cli.segment_everything import parse_box

    return parse_box(text)
