"""``omniseg train``: fine-tune a checkpoint or train a config from scratch on a dataset folder.

    omniseg train --model path/or/hub-id --data DATASET --out OUT [--epochs N | --max-steps N]
    torchrun --nproc-per-node 2 -m omniseg train ...      # data-parallel, same arguments

``DATASET`` is a semantic folder (``images/<split>``, ``labels/<split>``, ``id2label.json``)
or a COCO folder (``annotations/panoptic_<split>.json`` with its PNG folder, or
``annotations/instances_<split>.json``; images in ``<split>/`` or ``images/<split>/``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from omniseg.cli import argtypes
from omniseg.errors import OmnisegError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune or train a model on a dataset folder",
        description="Fine-tune a checkpoint (a new id2label from the dataset replaces the class head "
        "when labels differ) or train from a config.json; resumable, data-parallel under torchrun.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory / hub id, or a config.json")
    parser.add_argument("--data", required=True, type=Path, help="dataset folder (images/, labels/, id2label.json)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (model, log.jsonl, checkpoints/)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=argtypes.integer(minimum=1),
                        help="epochs to train (default 1 when --max-steps is not given)")
    length.add_argument("--max-steps", type=argtypes.integer(minimum=1), help="optimizer steps to train")
    length.add_argument("--time-budget", type=argtypes.number(above=0), metavar="SECONDS",
                        help="train for about this long: the step time is measured over the first 60 steps and "
                        "the schedule set to the steps that fit (evaluations and checkpoints not counted)")
    parser.add_argument("--batch-size", type=argtypes.integer(minimum=1), default=2,
                        help="images per process and step (default 2)")
    parser.add_argument("--grad-accum", type=argtypes.integer(minimum=1), default=1,
                        help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--lr", type=argtypes.number(above=0), default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--weight-decay", type=argtypes.number(minimum=0), default=0.05)
    parser.add_argument("--backbone-lr-mult", type=argtypes.number(minimum=0), default=0.1,
                        help="backbone lr multiplier (default 0.1)")
    parser.add_argument("--warmup-steps", type=argtypes.integer(minimum=0), default=0)
    parser.add_argument("--poly-power", type=argtypes.number(minimum=0), default=1.0)
    parser.add_argument("--clip-grad", type=argtypes.number(minimum=0), default=1.0,
                        help="gradient norm clip (0 disables)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/")
    parser.add_argument("--eval-every", type=argtypes.integer(minimum=0), default=None,
                        help="evaluate (mean IoU) every N steps (0 or not given: never)")
    parser.add_argument("--log-every", type=argtypes.integer(minimum=1), default=10)
    parser.add_argument("--checkpoint-every", type=argtypes.integer(minimum=1), default=None,
                        help="default: --eval-every, else every epoch")
    parser.add_argument("--num-workers", type=argtypes.integer(minimum=0), default=0,
                        help="data-loading worker processes")
    parser.add_argument("--crop-size", type=argtypes.integer(minimum=1), nargs="+", default=[512], metavar="N",
                        help="training crop: one size (square) or HEIGHT WIDTH (default 512)")
    parser.add_argument("--scale-range", type=argtypes.number(above=0), nargs=2, default=[0.5, 2.0],
                        metavar=("MIN", "MAX"))
    parser.add_argument("--no-color-jitter", action="store_true")
    parser.add_argument("--ignore-index", type=argtypes.integer(minimum=0), default=None,
                        help="the dataset's unlabelled value (default: as its README says, else 255)")
    parser.add_argument("--reduce-labels", action="store_true", help="dataset label 0 is background (ignored)")
    parser.add_argument("--panoptic", action="store_true",
                        help="Mask2Former: train on panoptic targets (one per connected component of a thing "
                        "class, one per stuff class) and report PQ at evaluation")
    parser.add_argument("--semantic-aux-weight", type=argtypes.number(minimum=0), default=0.0, metavar="W",
                        help="Mask2Former: add a training-only per-pixel cross-entropy on the mask features "
                        "with this weight (speeds up training from scratch; the saved model is unchanged; "
                        "default 0: off)")
    parser.add_argument("--thing-classes", default=None,
                        help="comma-separated thing class names or ids for --panoptic (default: the README's)")
    parser.add_argument("--train-split", default="train", help="split(s) to train on, comma-separated (default train)")
    parser.add_argument("--eval-split", default="val", help="split(s) to evaluate on, comma-separated (default val)")
    parser.add_argument("--group-by", metavar="REGEX",
                        help="semantic folders: the group (drive, camera, site) of a file is the first capture "
                        "group of REGEX in its name, e.g. '^([^_]+)_' for CamVid's drives")
    parser.add_argument("--holdout-groups", metavar="G[,G]",
                        help="with --group-by: leave these groups out of training and evaluate on them only "
                        "(their frames from --eval-split), so the score is on places the run never saw")
    parser.add_argument("--strong-augment", action="store_true",
                        help="add gamma, blur, sensor noise and JPEG changes to the colour jitter")
    parser.add_argument("--ema-decay", type=argtypes.number(above=0, below=1), default=None, metavar="D",
                        help="keep an exponential moving average of the weights (e.g. 0.999) and evaluate and "
                        "save it instead of the raw weights")
    parser.add_argument("--class-balance", action="store_true",
                        help="with --semantic-aux-weight: weigh the per-pixel loss by median-frequency "
                        "class balancing over the training labels")
    parser.add_argument("--copy-paste", metavar="CLASS[,CLASS]",
                        help="semantic folders: paste these classes' pixels (names or ids) from another "
                        "training sample, augmented on its own, onto a sample (for rare and thin classes)")
    parser.add_argument("--copy-paste-prob", type=argtypes.number(minimum=0, maximum=1), default=None, metavar="P",
                        help="with --copy-paste: the share of samples that receive pasted pixels (default 0.5)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--amp", action="store_true",
                           help="bfloat16 mixed precision on the CPU too (evaluation stays float32): "
                           "much faster where the CPU has bfloat16 products (AVX512-BF16 or AMX), "
                           "slower where it would emulate them")
    precision.add_argument("--no-amp", action="store_true",
                           help="no mixed precision (by default CUDA trains in bfloat16/float16 autocast, the CPU in float32)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--stop-at-step", type=argtypes.integer(minimum=1), default=None,
                        help="stop after this step as if interrupted (checkpointed; the schedule still "
                        "spans the full run), to be continued with --resume")
    return parser


def run(args: argparse.Namespace) -> int:
    from omniseg.data.augment import ColorJitter, CopyPaste, PhotometricAugmentation, TrainAugmentation
    from omniseg.data.coco import CocoSegmentationDataset, coco_reader
    from omniseg.data.dataset import SegmentationDataset, folder_samples, pixel_counts
    from omniseg.data.groups import compile_group_pattern, group_counts, parse_groups, select_groups
    from omniseg.data.semantic import read_dataset_info, resolve_classes
    from omniseg.models.auto import MASK_CLASSIFICATION_TYPES
    from omniseg.train.checkpointing import latest_checkpoint
    from omniseg.train.distributed import cleanup, init_distributed
    from omniseg.train.setup import load_for_training
    from omniseg.train.semantic_aux import median_frequency_weights
    from omniseg.train.trainer import Trainer, TrainingArguments

    class_weights = None
    try:
        dist_info = init_distributed(args.device)
        problem = argtypes.output_folder_problem(args.out)
        if problem is not None:  # before the data and model load, not at the first checkpoint
            raise OmnisegError(problem)
        # Errors name the option they come from, as evaluate's do ("/x: no such directory"
        # alone left the user to guess whether --model or --data was meant).
        try:
            coco = coco_reader(args.data, args.train_split)
            if coco is not None:
                id2label = coco.categories.id2label
            else:
                things = args.thing_classes.split(",") if args.thing_classes else None
                info = read_dataset_info(args.data, ignore_index=args.ignore_index, thing_classes=things)
                id2label = info.id2label
        except OmnisegError as exc:
            raise OmnisegError(f"--data: {exc}") from exc
        try:
            model, processor, model_type, reinitialised = load_for_training(
                args.model, id2label=id2label, seed=args.seed
            )
        except OmnisegError as exc:
            raise OmnisegError(f"--model: {exc}") from exc
        crop = tuple(args.crop_size) if len(args.crop_size) == 2 else (args.crop_size[0], args.crop_size[0])
        if len(args.crop_size) > 2:
            raise OmnisegError("--crop-size takes one or two numbers")
        if model_type in MASK_CLASSIFICATION_TYPES and (crop[0] % 32 or crop[1] % 32):
            raise OmnisegError(f"--crop-size {crop} must be a multiple of 32 for {model_type} (Swin strides)")
        augment = TrainAugmentation(
            crop_size=crop,
            scale_range=tuple(args.scale_range),
            color_jitter=None if args.no_color_jitter else ColorJitter(),
            photometric=PhotometricAugmentation() if args.strong_augment else None,
        )
        if (args.group_by or args.holdout_groups) and coco is not None:
            raise OmnisegError("--group-by / --holdout-groups are for semantic dataset folders")
        if args.holdout_groups and not args.group_by:
            raise OmnisegError("--holdout-groups needs --group-by (how a file's group is read from its name)")
        if args.class_balance and args.semantic_aux_weight <= 0:
            raise OmnisegError("--class-balance weighs the auxiliary per-pixel loss: give --semantic-aux-weight too")
        if args.copy_paste and coco is not None:
            raise OmnisegError("--copy-paste is for semantic dataset folders")
        if args.copy_paste_prob is not None and not args.copy_paste:
            raise OmnisegError("--copy-paste-prob needs --copy-paste (which classes to paste)")
        if coco is not None:
            # COCO: instance targets from the annotations; PQ at evaluation for Mask2Former.
            train_set = CocoSegmentationDataset(coco, augment=augment, seed=args.seed)
            eval_set = None
            if args.eval_every:
                eval_reader = coco_reader(args.data, args.eval_split)
                if eval_reader is None:
                    raise OmnisegError(f"{args.data}: no COCO annotations for the eval split {args.eval_split!r}")
                eval_set = CocoSegmentationDataset(eval_reader)
        else:
            if args.panoptic and model_type not in MASK_CLASSIFICATION_TYPES:
                raise OmnisegError(
                    f"--panoptic needs a mask-classification model (Mask2Former, MaskFormer), not {model_type}"
                )
            if args.panoptic and not info.thing_ids and dist_info.is_main:
                print("--panoptic: no thing classes (give --thing-classes or list them in the README); "
                      "every class is one segment", file=sys.stderr)
            common = dict(num_labels=len(id2label), ignore_index=info.ignore_index, reduce_labels=args.reduce_labels)
            train_samples = folder_samples(args.data, args.train_split)
            eval_samples = folder_samples(args.data, args.eval_split) if args.eval_every else None
            if args.group_by:
                pattern = compile_group_pattern(args.group_by)
                holdout = parse_groups(args.holdout_groups)
                train_samples = select_groups(train_samples, pattern, drop=holdout)
                if eval_samples is not None and holdout:
                    eval_samples = select_groups(eval_samples, pattern, keep=holdout)
                if dist_info.is_main:
                    print(f"training groups: {group_counts(train_samples, pattern)}"
                          + (f"; evaluation groups: {group_counts(eval_samples, pattern)}" if eval_samples else ""),
                          file=sys.stderr)
            if args.class_balance:
                counts = pixel_counts(train_samples, **common)
                class_weights = median_frequency_weights(counts)
                if dist_info.is_main:
                    print("class weights: " + ", ".join(f"{id2label[c]} {w:.2f}" for c, w in enumerate(class_weights)
                                                       if c in id2label), file=sys.stderr)
            copy_paste = None
            if args.copy_paste:
                pasted = resolve_classes(args.copy_paste.split(","), id2label, "--copy-paste")
                prob = 0.5 if args.copy_paste_prob is None else args.copy_paste_prob
                copy_paste = CopyPaste(class_ids=pasted, prob=prob)
            train_set = SegmentationDataset(
                train_samples,
                augment=augment,
                seed=args.seed,
                thing_ids=info.thing_ids if args.panoptic else None,
                copy_paste=copy_paste,
                **common,
            )
            eval_set = None if eval_samples is None else SegmentationDataset(eval_samples, **common)
        training_args = TrainingArguments(
            out=args.out,
            max_steps=args.max_steps,
            epochs=args.epochs if args.epochs is not None or args.max_steps is not None or args.time_budget else 1,
            time_budget=args.time_budget,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            lr=args.lr,
            weight_decay=args.weight_decay,
            backbone_lr_multiplier=args.backbone_lr_mult,
            warmup_steps=args.warmup_steps,
            poly_power=args.poly_power,
            clip_grad_norm=args.clip_grad or None,
            seed=args.seed,
            eval_every=args.eval_every,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            num_workers=args.num_workers,
            mixed_precision=True if args.amp else False if args.no_amp else None,
            resume=args.resume,
            stop_at_step=args.stop_at_step,
            progress=not args.no_progress,
            semantic_aux_weight=args.semantic_aux_weight,
            semantic_aux_class_weights=class_weights,
            ema_decay=args.ema_decay,
        )
        if reinitialised and dist_info.is_main:
            print(f"new classes from {args.data / 'id2label.json'}: re-initialised {', '.join(reinitialised)}",
                  file=sys.stderr)
        try:
            earlier = None if args.resume else latest_checkpoint(args.out)
        except OmnisegError:  # a broken pointer matters to --resume only
            earlier = None
        if earlier is not None and dist_info.is_main:
            # A run restarted after a crash without --resume would otherwise start over in
            # silence, replacing the earlier run's log and model.
            print(f"omniseg train: {earlier.parent} holds an earlier run (latest: {earlier.name}); starting a "
                  "new run over it. Stop and pass --resume to continue that run instead.", file=sys.stderr)
        trainer = Trainer(model, processor, model_type, train_set, eval_set, training_args, dist_info)
        summary = trainer.train()
    except OmnisegError as exc:
        print(f"omniseg train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    if dist_info.is_main:
        best = summary["best_metric"]
        done = "finished" if summary["step"] >= trainer.total_steps else "stopped"
        line = f"{done} at step {summary['step']}/{trainer.total_steps}"
        if math.isnan(summary["last_loss"]):
            # No step ran in this call (a finite loss always, or training stops with an error):
            # --resume of a finished run. Its loss is in log.jsonl, not "nan".
            line += ", no step left to train"
        else:
            line += f", last loss {summary['last_loss']:.4f}"
        if best is not None:
            line += f", best mean IoU {best:.4f} at step {summary['best_step']}"
        print(f"{line}; output in {args.out}")
    return 0
