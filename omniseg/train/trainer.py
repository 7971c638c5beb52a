"""The training loop: Mask2Former (mask classification loss) and SegFormer (per-pixel loss).

One :class:`Trainer` runs single-process or under ``torchrun`` (DDP) unchanged. Per optimiser
step it accumulates ``grad_accum`` micro-batches, clips the gradient norm, steps AdamW and
the warm-up + poly schedule; every ``eval_every`` steps it measures streaming mean IoU on the
evaluation set (counts summed over ranks) and keeps the best model at ``OUT``; every
``checkpoint_every`` steps it writes an atomic checkpoint from which ``resume=True``
continues bit for bit. Only rank 0 writes files.

Files under ``OUT``: ``config.json``/``model.safetensors``/``preprocessor_config.json`` (the
best model, or the final one without evaluation), ``log.jsonl`` (one JSON object per logged
step), ``curves.png`` (loss and metric curves, when matplotlib is installed),
``trainer_state.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from omniseg.data.dataset import IGNORE, EvalCollator, TrainCollator
from omniseg.errors import CheckpointError, OmnisegError
from omniseg.data.targets import instances_from_semantic
from omniseg.evaluation import PanopticQuality, SemanticSegmentationMetric
from omniseg.io.atomic import atomic_open, atomic_write_text
from omniseg.models.auto import MASK_CLASSIFICATION_TYPES
from omniseg.ops.bfloat16 import native_bfloat16
from omniseg.train import checkpointing
from omniseg.train.distributed import (
    DistInfo,
    GlobalBatchSampler,
    ShardSampler,
    all_gather_objects,
    all_reduce_sum,
    barrier,
)
from omniseg.train.optim import build_optimizer, build_scheduler
from omniseg.train.semantic_aux import SemanticAuxiliaryLoss


# Provisional length of a time-budgeted run until its step time is measured.
UNFITTED_STEPS = 10**9


class TrainingError(OmnisegError):
    """Training cannot go on (a NaN/inf loss, an unusable resume state...)."""


@dataclasses.dataclass
class TrainingArguments:
    """Settings of a run. Batch sizes are per process; the global batch is
    ``batch_size * world_size * grad_accum``."""

    out: Path
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_multiplier: float = 0.1
    warmup_steps: int = 0
    poly_power: float = 1.0
    grad_accum: int = 1
    clip_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None
    log_every: int = 10
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    num_workers: int = 0
    # None: bfloat16/float16 autocast on CUDA, float32 on the CPU; True: also bfloat16 autocast
    # on the CPU (1.65x per step on an AMD Zen 5 core, which has native bfloat16 products);
    # False: float32 everywhere.
    mixed_precision: bool | None = None
    resume: bool = False
    stop_at_step: int | None = None
    progress: bool = True
    eval_batch_size: int = 1
    # Mask2Former only: weight of the training-only per-pixel semantic loss (0 = off), see
    # omniseg.train.semantic_aux.
    semantic_aux_weight: float = 0.0
    # Per-class weights of that loss (e.g. median-frequency balancing), ``None`` = equal.
    semantic_aux_class_weights: list[float] | None = None
    # Exponential moving average of the weights (e.g. 0.999): evaluated and saved instead of
    # the raw weights; ``None`` = off.
    ema_decay: float | None = None
    # Train for about this many seconds: the step time is measured over the first steps and
    # the schedule is set to the number of steps that fit (evaluations not counted).
    time_budget: float | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.time_budget is not None:
            if self.time_budget <= 0:
                raise ValueError("time_budget must be positive")
            if self.max_steps is not None:
                raise ValueError("give max_steps or time_budget, not both")
            # Provisional length until the step time is measured; the decay over the
            # measured steps is then negligible.
            self.max_steps, self.epochs = UNFITTED_STEPS, None
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give epochs or max_steps")
        if self.grad_accum < 1 or self.batch_size < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")
        if self.semantic_aux_weight < 0:
            raise ValueError("semantic_aux_weight must be at least 0")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError("ema_decay must be between 0 and 1")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            moved[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            moved[key] = value
    return moved


def _json_safe(value: Any) -> Any:
    """Metrics as JSON: arrays to lists, NaN to ``None``."""
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def _batches(loader: DataLoader) -> Iterator[Any]:
    """Iterate ``loader``; a sample error raised in a worker process comes back from
    PyTorch as a ``RuntimeError`` holding the worker's traceback, turned here into a
    :class:`TrainingError` whose message is the original error (which names the file)."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as exc:
            text = str(exc)
            if "DataLoader worker" not in text:
                raise
            raise TrainingError(f"loading a sample failed: {text.strip().splitlines()[-1]}") from exc
        yield batch


class Trainer:
    """Trains ``model`` on ``train_dataset``; evaluates on ``eval_dataset`` when given.

    Args:
        model: an omniseg model (``Mask2FormerForUniversalSegmentation``,
            ``MaskFormerForInstanceSegmentation`` or ``SegformerForSemanticSegmentation``)
            whose forward returns ``loss`` given targets.
        processor: the model's image processor (used to collate and to post-process).
        model_type: ``"mask2former"``, ``"maskformer"`` or ``"segformer"``.
        train_dataset, eval_dataset: :class:`~omniseg.data.dataset.SegmentationDataset`.
        args: :class:`TrainingArguments`.
        dist_info: this process's place in the job (default: single process on the CPU).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        model_type: str,
        train_dataset: Dataset,
        eval_dataset: Dataset | None,
        args: TrainingArguments,
        dist_info: DistInfo | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.model_type = model_type
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.args = args
        self.dist = dist_info or DistInfo()
        self.device = self.dist.device
        self.amp_dtype: torch.dtype | None = None
        if args.mixed_precision is not False and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif args.mixed_precision and self.device.type == "cpu":
            self.amp_dtype = torch.bfloat16
            if not native_bfloat16() and self.dist.is_main:
                tqdm.write("warning: this CPU has no bfloat16 products: --amp emulates them, slower than float32")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.model.to(self.device)
        self.optimizer = build_optimizer(
            self.model,
            model_type=model_type,
            lr=args.lr,
            weight_decay=args.weight_decay,
            backbone_lr_multiplier=args.backbone_lr_multiplier,
        )
        self.semantic_aux: SemanticAuxiliaryLoss | None = None
        if args.semantic_aux_weight > 0:
            if model_type != "mask2former":
                raise TrainingError(f"the auxiliary semantic loss is for Mask2Former, not {model_type}")
            # Its own seeded initialisation, so building it leaves the global RNG as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                self.semantic_aux = SemanticAuxiliaryLoss(
                    in_channels=model.config.mask_feature_size,
                    num_labels=model.config.num_labels,
                    ignore_index=IGNORE,
                    weight=args.semantic_aux_weight,
                    class_weights=args.semantic_aux_class_weights,
                ).to(self.device)
            self.semantic_aux.attach(self.model)
            self.optimizer.add_param_group(
                {"params": list(self.semantic_aux.parameters()), "lr": args.lr, "weight_decay": 0.0,
                 "name": "semantic_aux"}
            )
        # The averaged weights: a frozen copy that follows the trained ones after each step.
        self.ema: nn.Module | None = None
        if args.ema_decay is not None:
            self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.sampler = GlobalBatchSampler(
            len(train_dataset),
            batch_size=args.batch_size,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            seed=args.seed,
        )
        per_epoch = self.sampler.num_samples // args.batch_size // args.grad_accum
        if per_epoch < 1:
            raise TrainingError(
                f"the training set ({len(train_dataset)} samples) is smaller than one global batch "
                f"({args.batch_size} x {self.dist.world_size} processes x {args.grad_accum} accumulation)"
            )
        self.steps_per_epoch = per_epoch
        self.total_steps = args.max_steps if args.max_steps is not None else args.epochs * per_epoch
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=args.warmup_steps,
            total_steps=self.total_steps,
            power=args.poly_power,
        )
        self.ddp_model: nn.Module = self.model
        if self.dist.distributed and self.device.type == "cuda":
            # Batch statistics over the global batch, as the recipes train (in place: the
            # module tree, its type and its state-dict keys stay the same). CPU has no
            # SyncBatchNorm: there each rank normalises with its own batch.
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.dist.distributed:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        # Progress counters, all restored on resume.
        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches of this rank consumed in the current epoch
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.step_lr = 0.0  # learning rate of the last optimiser step (of its head group)
        self.history: list[dict[str, Any]] = []
        self._clock: dict[int, float] = {}  # step -> time, for the time budget

    # ------------------------------------------------------------------ data

    def _train_loader(self) -> DataLoader:
        self.sampler.set_position(self.epoch, self.batches_done * self.args.batch_size)
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(self.epoch)
        # A dedicated generator seeds the workers, so creating a loader never consumes the
        # global RNG (which the Mask2Former loss draws its points from): a resumed run's
        # stream then equals an uninterrupted one's.
        generator = torch.Generator().manual_seed(self.args.seed * 1000 + self.epoch)
        return DataLoader(
            self.train_dataset,
            batch_size=self.args.batch_size,
            sampler=self.sampler,
            num_workers=self.args.num_workers,
            collate_fn=TrainCollator(self.processor, self.model_type, semantic_labels=self.semantic_aux is not None),
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            generator=generator,
        )

    def _eval_loader(self) -> DataLoader:
        assert self.eval_dataset is not None
        return DataLoader(
            self.eval_dataset,
            batch_size=self.args.eval_batch_size,
            sampler=ShardSampler(len(self.eval_dataset), num_replicas=self.dist.world_size, rank=self.dist.rank),
            num_workers=self.args.num_workers,
            collate_fn=EvalCollator(self.processor),
            generator=torch.Generator().manual_seed(0),
        )

    # ------------------------------------------------------------------ files (rank 0)

    @property
    def log_path(self) -> Path:
        return self.args.out / "log.jsonl"

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.dist.is_main:
            return
        self.args.out.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """After a resume, drop log lines of steps the checkpoint does not contain."""
        if not self.log_path.is_file():
            return
        kept = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by the kill
            if record.get("step", 0) <= self.step:
                kept.append(record)
        self.history = kept
        if self.dist.is_main:
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))

    @property
    def inference_model(self) -> nn.Module:
        """The weights that are evaluated and saved: the moving average when kept, else the model."""
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def _update_ema(self) -> None:
        """Move the averaged weights towards the model's. The decay ramps up over the first
        steps ((1 + step) / (10 + step)), so the random initialisation is forgotten quickly."""
        if self.ema is None:
            return
        decay = min(self.args.ema_decay, (1 + self.step) / (10 + self.step))
        for averaged, current in zip(self.ema.parameters(), self.model.parameters()):
            averaged.lerp_(current.detach(), 1.0 - decay)
        for averaged, current in zip(self.ema.buffers(), self.model.buffers()):
            averaged.copy_(current)

    def save_model(self, directory: Path) -> None:
        """``save_pretrained`` of the model (its moving average when kept) and processor (rank 0)."""
        if self.dist.is_main:
            self.inference_model.save_pretrained(directory)
            self.processor.save_pretrained(directory)

    def _save_state(self) -> None:
        if self.dist.is_main:
            state = {"step": self.step, "best_metric": self.best_metric, "best_step": self.best_step,
                     "total_steps": self.total_steps, "epoch": self.epoch}
            atomic_write_text(self.args.out / "trainer_state.json", json.dumps(state, indent=2) + "\n")

    def plot_curves(self) -> Path | None:
        """``OUT/curves.png``: training loss and evaluation metric against step (rank 0)."""
        if not self.dist.is_main:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [r["step"] for r in self.history if "loss" in r]
        losses = [r["loss"] for r in self.history if "loss" in r]
        curves = {
            name: [(r["step"], r[key]) for r in self.history if r.get(key) is not None]
            for name, key in (("mean IoU", "eval_mean_iou"), ("PQ", "eval_pq"))
        }
        curves = {name: points for name, points in curves.items() if points}
        fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(10 if curves else 5, 3.5), squeeze=False)
        axes[0][0].plot(steps, losses, lw=1)
        axes[0][0].set(xlabel="step", ylabel="training loss", title="loss")
        if curves:
            for name, points in curves.items():
                axes[0][1].plot(*zip(*points), marker="o", label=name)
            axes[0][1].set(xlabel="step", ylabel="metric", title="evaluation")
            axes[0][1].legend()
        fig.tight_layout()
        path = self.args.out / "curves.png"
        with atomic_open(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100)
        plt.close(fig)
        return path

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> None:
        """Write a checkpoint of the current step (collective: every rank must call it)."""
        rng_states = all_gather_objects(checkpointing.capture_rng_state())
        if self.dist.is_main:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batches_done": self.batches_done,
                "world_size": self.dist.world_size,
                "batch_size": self.args.batch_size,
                "grad_accum": self.args.grad_accum,
                "total_steps": self.total_steps,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "semantic_aux": None if self.semantic_aux is None else self.semantic_aux.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(),
                "best_metric": self.best_metric,
                "best_step": self.best_step,
                "rng": rng_states,
            }
            checkpointing.save_checkpoint(self.args.out, state, keep=self.args.keep_checkpoints)
        barrier()

    def resume(self) -> bool:
        """Restore the latest checkpoint under ``OUT``; ``False`` when there is none."""
        path = checkpointing.latest_checkpoint(self.args.out)
        if path is None:
            return False
        state = checkpointing.load_checkpoint(path)
        if state["batches_done"] and (
            state["world_size"] != self.dist.world_size or state["batch_size"] != self.args.batch_size
            or state["grad_accum"] != self.args.grad_accum
        ):
            raise CheckpointError(
                path,
                f"stopped mid-epoch with {state['world_size']} process(es), batch {state['batch_size']}, "
                f"accumulation {state['grad_accum']}; resume with the same settings",
            )
        if self.total_steps == UNFITTED_STEPS:
            # A time-budgeted run goes on with the length it fitted (or fits it, if stopped earlier).
            self.total_steps = state["total_steps"]
        elif state["total_steps"] != self.total_steps and self.dist.is_main:
            tqdm.write(
                f"warning: {path} is from a run of {state['total_steps']} steps, this one has "
                f"{self.total_steps}: the learning-rate schedule changes from here on"
            )
        saved_aux = state.get("semantic_aux")
        if (saved_aux is None) != (self.semantic_aux is None):
            raise CheckpointError(
                path,
                "the checkpoint was written " + ("with" if saved_aux is not None else "without")
                + " the auxiliary semantic loss; resume with the same --semantic-aux-weight setting",
            )
        saved_ema = state.get("ema")
        if (saved_ema is None) != (self.ema is None):
            raise CheckpointError(
                path,
                "the checkpoint was written " + ("with" if saved_ema is not None else "without")
                + " weight averaging; resume with the same --ema-decay setting",
            )
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(saved_ema)
        if self.semantic_aux is not None:
            self.semantic_aux.load_state_dict(saved_aux)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.args.time_budget is not None:
            self.scheduler = build_scheduler(
                self.optimizer, warmup_steps=self.args.warmup_steps, total_steps=self.total_steps,
                power=self.args.poly_power, steps_done=self.step,
            )
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.best_metric, self.best_step = state["best_metric"], state["best_step"]
        rng = state["rng"]
        checkpointing.restore_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])
        self._truncate_log()
        return True

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Streaming metrics on the evaluation set, counts summed over ranks.

        Semantic metrics (``mean_iou`` ...) always; for a Mask2Former trained on panoptic
        targets (the training set has ``thing_ids``) also ``pq``, ``sq``, ``rq``, ``pq_things``,
        ``pq_stuff`` against connected-component ground truth.
        """
        assert self.eval_dataset is not None
        num_labels = self.model.config.num_labels
        metric = SemanticSegmentationMetric(num_labels=num_labels, ignore_index=IGNORE)
        things = getattr(self.train_dataset, "thing_ids", None) if self.model_type in MASK_CLASSIFICATION_TYPES else None
        panoptic = PanopticQuality({c: c in things for c in range(num_labels)}) if things is not None else None
        model = self.inference_model
        was_training = model.training
        if self.dist.distributed:
            # Each rank's batch-norm running statistics were last updated from its own batch;
            # evaluate (and save) rank 0's model everywhere.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        model.eval()
        for batch in _batches(self._eval_loader()):
            inputs = _to_device(batch["inputs"], self.device)
            with self._autocast(evaluation=True):
                outputs = model(**inputs)
            sizes = [tuple(label.shape) for label in batch["labels"]]
            predictions = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
            metric.update([p.cpu() for p in predictions], batch["labels"])
            if panoptic is not None:
                self._update_panoptic(panoptic, outputs, batch["labels"], things, batch.get("instances"))
        metric.all_reduce()
        model.train(was_training)
        result = metric.compute()
        if panoptic is not None:
            total = PanopticQuality(panoptic.categories)
            for part in all_gather_objects(panoptic):
                total.merge(part)
            pq = total.compute()
            result.update(
                pq=pq["All"]["pq"], sq=pq["All"]["sq"], rq=pq["All"]["rq"],
                pq_things=pq["Things"]["pq"], pq_stuff=pq["Stuff"]["pq"],
            )
        return result

    def _update_panoptic(
        self,
        metric: Any,
        outputs: Any,
        labels: list[torch.Tensor],
        things: frozenset[int],
        instances: list[tuple[torch.Tensor, dict[int, int]]] | None,
    ) -> None:
        """Count one batch for PQ: predicted panoptic segments against the ground-truth
        instances (COCO), or the connected components of thing classes (semantic data)."""
        stuff = {c for c in range(self.model.config.num_labels) if c not in things}
        results = self.processor.post_process_panoptic_segmentation(
            outputs, threshold=0.5, label_ids_to_fuse=stuff, target_sizes=[tuple(lab.shape) for lab in labels]
        )
        for i, (result, label) in enumerate(zip(results, labels)):
            if instances is not None:
                segment_map, mapping = instances[i]
                segment_map = segment_map.numpy()
            else:
                segment_map, mapping = instances_from_semantic(label.numpy(), things, ignore_index=IGNORE)
            # PanopticQuality's VOID is 0: shift segment ids up by one, unlabelled pixels to 0.
            gt_ids = np.where(segment_map == IGNORE, 0, segment_map.astype(np.int64) + 1)
            gt_segments = [{"id": k + 1, "category_id": c} for k, c in mapping.items()]
            segmentation = result["segmentation"]
            if segmentation is None:
                segmentation = torch.full(tuple(label.shape), -1)
            metric.update(segmentation.cpu().numpy().astype(np.int64), result["segments_info"], gt_ids, gt_segments)

    # ------------------------------------------------------------------ training

    def _autocast(self, *, evaluation: bool = False) -> contextlib.AbstractContextManager:
        # The CPU evaluates in float32, as the pipeline runs there: checkpoints are picked on
        # the numbers users will get.
        if self.amp_dtype is None or (evaluation and self.device.type == "cpu"):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _micro_step(self, batch: dict[str, Any], sync: bool) -> float:
        """Forward and backward of one micro-batch; returns its loss (averaged over ranks)."""
        batch = _to_device(batch, self.device)
        semantic_labels = batch.pop("semantic_labels", None)
        context = contextlib.nullcontext() if sync or not self.dist.distributed else self.ddp_model.no_sync()
        with context:
            with self._autocast():
                loss = self.ddp_model(**batch).loss
                if self.semantic_aux is not None:
                    loss = loss + self.semantic_aux(semantic_labels)
            # Every rank must see a bad loss, or the healthy ones would wait for the others
            # in backward's all-reduce forever.
            reduced = all_reduce_sum(loss.detach().float().clone()) / self.dist.world_size
            if not torch.isfinite(reduced):
                raise TrainingError(
                    f"the loss became {float(reduced)} at step {self.step + 1} (learning rate "
                    f"{self.scheduler.get_last_lr()[0]:.3g}); training stopped. Lower --lr, check the "
                    f"labels, or resume from the last checkpoint in {checkpointing.checkpoint_dir(self.args.out)}"
                )
            self.scaler.scale(loss / self.args.grad_accum).backward()
        return float(reduced)

    def _optimizer_step(self) -> None:
        params = list(self.model.parameters())
        if self.semantic_aux is not None:
            # The head lives outside DDP: average its gradients over ranks here.
            for param in self.semantic_aux.parameters():
                if param.grad is not None:
                    all_reduce_sum(param.grad).div_(self.dist.world_size)
            params += list(self.semantic_aux.parameters())
        if self.args.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(params, self.args.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def train(self) -> dict[str, Any]:
        """Run (or resume) training to ``total_steps`` (or ``stop_at_step``).

        Returns a summary: ``step``, ``best_metric``, ``best_step``, ``last_loss``.
        """
        args = self.args
        resumed = args.resume and self.resume()
        if not resumed:
            # Different ranks draw different sample points (Mask2Former loss) from their own RNG.
            torch.manual_seed(args.seed + self.dist.rank)
            np.random.seed((args.seed + self.dist.rank) % 2**32)
            if self.dist.is_main and self.log_path.exists():
                self.log_path.unlink()
        checkpoint_every = args.checkpoint_every or args.eval_every or max(1, self.steps_per_epoch)
        stop = min(self.total_steps, args.stop_at_step or self.total_steps)
        self.model.train()
        progress = tqdm(
            total=self.total_steps, initial=self.step, disable=not (args.progress and self.dist.is_main),
            desc="train", unit="step", dynamic_ncols=True,
        )
        last_loss = float("nan")
        window: list[float] = []
        window_start, window_samples = time.perf_counter(), 0
        global_batch = args.batch_size * self.dist.world_size
        try:
            while self.step < stop:
                micro_losses: list[float] = []
                for batch in _batches(self._train_loader()):
                    self.batches_done += 1
                    sync = len(micro_losses) + 1 == args.grad_accum
                    micro_losses.append(self._micro_step(batch, sync))
                    window_samples += global_batch
                    if not sync:
                        continue
                    self.step_lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                    self._optimizer_step()
                    self._update_ema()
                    self.step += 1
                    if args.time_budget is not None and self._fit_time_budget():
                        stop = min(self.total_steps, args.stop_at_step or self.total_steps)
                        progress.total = self.total_steps
                    last_loss = sum(micro_losses) / len(micro_losses)
                    window.append(last_loss)
                    micro_losses = []
                    progress.update(1)
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{self.step_lr:.2e}")
                    self._after_step(window, window_start, window_samples, checkpoint_every, stop)
                    if self.step % args.log_every == 0 or self.step == stop:
                        window, window_start, window_samples = [], time.perf_counter(), 0
                    if self.step >= stop:
                        break
                else:
                    # The epoch ran out (leftover micro-batches short of an accumulation are dropped).
                    self.optimizer.zero_grad(set_to_none=True)
                    self.epoch += 1
                    self.batches_done = 0
        finally:
            progress.close()
        if self.step >= self.total_steps:
            if self.best_step is None:
                self.save_model(args.out)
            self._save_state()
        self.plot_curves()
        barrier()
        return {"step": self.step, "best_metric": self.best_metric, "best_step": self.best_step, "last_loss": last_loss}

    # Steps between which the step time is measured for a time budget (the first ones pay for
    # warm-up: worker start, allocator, CUDA kernels).
    _BUDGET_CLOCK = (10, 60)

    def _fit_time_budget(self) -> bool:
        """At the second clock step, set ``total_steps`` to what fits in the time budget and the
        schedule to match; ``True`` when it changed. A resumed run keeps its length."""
        first, last = self._BUDGET_CLOCK
        if self.total_steps != UNFITTED_STEPS:
            return False
        if self.step in (1, first):
            self._clock[self.step] = time.perf_counter()
        if self.step != last or first not in self._clock:
            return False
        now = time.perf_counter()
        per_step = (now - self._clock[first]) / (last - first)
        remaining = self.args.time_budget - (now - self._clock[1])
        self.total_steps = max(last + 1, last + int(remaining / per_step))
        self.scheduler = build_scheduler(
            self.optimizer, warmup_steps=self.args.warmup_steps, total_steps=self.total_steps,
            power=self.args.poly_power, steps_done=self.step,
        )
        if self.dist.is_main:
            tqdm.write(f"time budget {self.args.time_budget:.0f} s at {per_step:.3f} s per step: "
                       f"{self.total_steps} steps")
        return True

    def _after_step(self, window: list[float], window_start: float, window_samples: int, checkpoint_every: int, stop: int) -> None:
        """Logging, evaluation, best-model saving and checkpointing after an optimiser step."""
        args = self.args
        record: dict[str, Any] | None = None
        if self.step % args.log_every == 0 or self.step == stop:
            elapsed = max(1e-9, time.perf_counter() - window_start)
            record = {
                "step": self.step,
                "epoch": self.epoch,
                "loss": sum(window) / len(window),
                "lr": self.step_lr,
                "samples_per_s": window_samples / elapsed,
            }
        evaluate = self.eval_dataset is not None and args.eval_every and (
            self.step % args.eval_every == 0 or self.step == self.total_steps
        )
        if evaluate:
            metrics = self.evaluate()
            record = record or {"step": self.step, "epoch": self.epoch, "lr": self.step_lr}
            for key, value in metrics.items():
                record[f"eval_{key}"] = _json_safe(value)
            score = metrics["mean_iou"]
            if math.isfinite(score) and (self.best_metric is None or score > self.best_metric):
                self.best_metric, self.best_step = float(score), self.step
                self.save_model(args.out)
            if self.dist.is_main:
                extra = f", PQ {metrics['pq']:.4f}" if "pq" in metrics else ""
                tqdm.write(f"step {self.step}: eval mean IoU {score:.4f}{extra} "
                           f"(best mean IoU {self.best_metric:.4f} at step {self.best_step})")
        if record is not None:
            self._log(record)
        if evaluate:
            self.plot_curves()
            self._save_state()
        if self.step % checkpoint_every == 0 or self.step == stop:
            self.checkpoint()
