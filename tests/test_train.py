"""``omniseg train`` end to end with tiny models on real CamVid frames.

Every run here is a real run of the command (in-process through ``omniseg.cli.main``, or as
subprocesses where a kill or ``torchrun`` is the point), on a handful of 360x480 CamVid
frames scaled down and cropped to 64x64 so the whole file stays fast on two CPU cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from omniseg.cli.main import main as omniseg_main
from omniseg.errors import InputError

REPO = Path(__file__).resolve().parents[1]
FAST = ["--crop-size", "64", "--scale-range", "0.2", "0.2", "--no-progress", "--log-every", "1", "--ignore-index", "11"]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def frames(camvid_dir: Path, tmp_path_factory) -> Path:
    """A small dataset folder: 4 training and 2 validation CamVid frames (symlinks)."""
    root = tmp_path_factory.mktemp("camvid_small")
    for split, count in (("train", 4), ("val", 2)):
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True)
        for image in sorted((camvid_dir / "images" / split).glob("*.png"))[:count]:
            (root / "images" / split / image.name).symlink_to(image)
            (root / "labels" / split / image.name).symlink_to(camvid_dir / "labels" / split / image.name)
    (root / "id2label.json").write_text((camvid_dir / "id2label.json").read_text())
    return root


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory) -> Path:
    """A tiny reference Mask2Former checkpoint (5 classes: fine-tuning replaces the head),
    with fewer loss points than the default 12544 so steps are fast."""
    from reference_models import build_reference_mask2former

    directory = build_reference_mask2former(tmp_path_factory.mktemp("m2f") / "model", perturb=0.02)
    config = json.loads((directory / "config.json").read_text())
    config["train_num_points"] = 256
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def segformer_config(tmp_path_factory) -> Path:
    """A tiny SegFormer ``config.json`` (training from scratch) with its processor beside it.
    Dropout and stochastic depth are off so that runs are comparable step by step."""
    transformers = pytest.importorskip("transformers")
    from omniseg.processing.segformer import SegformerImageProcessor

    directory = tmp_path_factory.mktemp("segformer_config")
    config = transformers.SegformerConfig(
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 2, 3, 4],
        sr_ratios=[8, 4, 2, 1],
        decoder_hidden_size=16,
        num_labels=2,
        classifier_dropout_prob=0.0,
        drop_path_rate=0.0,
    ).to_dict()
    (directory / "config.json").write_text(json.dumps(config))
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory / "config.json"


def train(*args: str | Path) -> int:
    return omniseg_main(["train", *map(str, args)])


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def _mean_iou(model_dir: Path, data: Path) -> float:
    """Mean IoU of a saved model on the ``val`` frames, computed directly."""
    import omniseg
    from omniseg.evaluation import SemanticSegmentationMetric

    model, processor = omniseg.load_model(model_dir), omniseg.load_processor(model_dir)
    metric = SemanticSegmentationMetric(num_labels=11, ignore_index=11)
    for image_path in sorted((data / "images" / "val").iterdir()):
        label = np.array(Image.open(data / "labels" / "val" / image_path.name))
        with torch.no_grad():
            outputs = model(**processor(Image.open(image_path).convert("RGB")))
        metric.update(processor.post_process_semantic_segmentation(outputs, target_sizes=[label.shape])[0], label)
    return metric.compute()["mean_iou"]


# ---------------------------------------------------------------------------- tests


def test_mask2former_fine_tuning_loss_falls_and_reference_loads_it(frames, mask2former_dir, tmp_path) -> None:
    out = tmp_path / "m2f"
    assert train("--model", mask2former_dir, "--data", frames, "--out", out, "--max-steps", "10",
                 "--batch-size", "2", "--lr", "3e-3", "--clip-grad", "0", "--backbone-lr-mult", "1",
                 "--no-color-jitter", "--eval-every", "5", *FAST) == 0
    log = read_log(out)
    losses = [r["loss"] for r in log]
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.92 * np.mean(losses[:3]), losses
    evals = [r for r in log if "eval_mean_iou" in r]
    assert [r["step"] for r in evals] == [5, 10] and all(0 <= r["eval_mean_iou"] <= 1 for r in evals)
    assert (out / "curves.png").stat().st_size > 0 and (out / "checkpoints" / "latest.json").is_file()

    # The saved model (new 11-class head) loads in omniseg and in the reference, same logits.
    import omniseg
    from transformers import Mask2FormerForUniversalSegmentation as Reference

    ours = omniseg.load_model(out)
    reference = Reference.from_pretrained(out).eval()
    assert ours.config.id2label[8] == "car" and reference.config.id2label[8] == "car"
    processor = omniseg.load_processor(out)
    image = Image.open(sorted((frames / "images" / "val").iterdir())[0]).convert("RGB")
    inputs = processor(image)
    with torch.no_grad():
        got = ours(inputs["pixel_values"])
        expected = reference(pixel_values=inputs["pixel_values"])
    assert got.class_queries_logits.shape[-1] == 12
    torch.testing.assert_close(got.class_queries_logits, expected.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.masks_queries_logits, expected.masks_queries_logits, atol=1e-4, rtol=1e-4)


def test_mask2former_panoptic_targets_report_pq(frames, mask2former_dir, tmp_path) -> None:
    """--panoptic: connected components of the README's thing classes (car, pedestrian,
    bicyclist) as instances; evaluation adds PQ next to mean IoU."""
    (frames / "README.md").write_text("ignore_index 11\nThings (countable objects): car, pedestrian, bicyclist.\n")
    out = tmp_path / "pan"
    try:
        assert train("--model", mask2former_dir, "--data", frames, "--out", out, "--max-steps", "2",
                     "--batch-size", "2", "--panoptic", "--eval-every", "2", *FAST[:-2]) == 0
    finally:
        (frames / "README.md").unlink()
    last = read_log(out)[-1]
    assert 0.0 <= last["eval_pq"] <= 1.0 and 0.0 <= last["eval_mean_iou"] <= 1.0
    assert {"eval_sq", "eval_rq", "eval_pq_things", "eval_pq_stuff"} <= set(last)


def test_segformer_from_config_loss_falls(frames, segformer_config, tmp_path) -> None:
    out = tmp_path / "seg"
    assert train("--model", segformer_config, "--data", frames, "--out", out, "--max-steps", "12",
                 "--batch-size", "2", "--lr", "1e-2", "--clip-grad", "0", "--backbone-lr-mult", "1",
                 "--no-color-jitter", *FAST) == 0
    losses = [r["loss"] for r in read_log(out)]
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    import omniseg

    model = omniseg.load_model(out)
    assert model.config.num_labels == 11


def test_mask2former_stop_and_resume_equals_uninterrupted_run(frames, mask2former_dir, tmp_path) -> None:
    """Mask2Former's loss draws random points from the global RNG, so this also checks that
    the RNG state and the data position are restored exactly."""
    # 4 frames, batch 2: two steps per epoch; the cut at step 3 lands mid-epoch.
    common = ["--model", mask2former_dir, "--data", frames, "--max-steps", "4", "--batch-size", "2",
              "--lr", "1e-3", "--checkpoint-every", "1", *FAST]
    assert train(*common, "--out", tmp_path / "full") == 0
    assert train(*common, "--out", tmp_path / "cut", "--stop-at-step", "3") == 0
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    assert train(*common, "--out", tmp_path / "cut", "--resume") == 0
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    full_log, cut_log = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    assert [r["step"] for r in cut_log] == [1, 2, 3, 4]
    assert [r["loss"] for r in full_log] == [r["loss"] for r in cut_log]


def test_killed_process_resumes_to_the_same_weights(frames, segformer_config, tmp_path) -> None:
    """A real SIGKILL part-way (data-loader worker processes on), then ``--resume``."""
    common = [sys.executable, "-m", "omniseg", "train", "--model", str(segformer_config), "--data", str(frames),
              "--max-steps", "24", "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "1",
              "--num-workers", "1", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*common, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    victim = subprocess.Popen([*common, "--out", str(tmp_path / "cut")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "cut" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if pointer.is_file() and json.loads(pointer.read_text())["step"] >= 5:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = json.loads(pointer.read_text())["step"]
    assert 5 <= killed_at < 24
    subprocess.run([*common, "--out", str(tmp_path / "cut"), "--resume"], check=True, env=env, capture_output=True)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    assert [r["step"] for r in read_log(tmp_path / "cut")] == list(range(1, 25))


def test_two_process_gloo_run_agrees_with_one_process_accumulating(frames, segformer_config, tmp_path) -> None:
    """``torchrun --nproc-per-node 2`` with batch 2 per process against one process with
    batch 2 and 2-step accumulation: the same global batch of 4, in the same micro-batches."""
    common = ["--model", str(segformer_config), "--data", str(frames), "--max-steps", "3", "--batch-size", "2",
              "--lr", "1e-3", "--eval-every", "3", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
         "-m", "omniseg", "train", *common, "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert train(*common, "--out", tmp_path / "single", "--grad-accum", "2") == 0
    # Trained parameters agree. Batch-norm running statistics are buffers, not trained: under
    # DDP (no SyncBatchNorm on CPU) rank 0's are kept, estimated from its micro-batches only.
    ddp_weights, single_weights = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    stats = ("running_mean", "running_var", "num_batches_tracked")
    # Biases that only shift channels just before a batch norm (the decode head's per-stage
    # projections, and the last encoder norm that feeds one) have an exactly zero gradient in
    # exact arithmetic; AdamW turns their rounding noise into full-size steps, so they differ
    # between any two runs that add gradients in a different order. Everything else agrees.
    no_signal = {f"decode_head.linear_c.{i}.proj.bias" for i in range(4)} | {"segformer.encoder.layer_norm.3.bias"}
    trained = {k for k in ddp_weights if not k.endswith(stats) and k not in no_signal}
    assert len(trained) > 30
    assert_same_weights({k: ddp_weights[k] for k in trained}, {k: single_weights[k] for k in trained}, atol=1e-5)
    ddp_log, single_log = read_log(tmp_path / "ddp"), read_log(tmp_path / "single")
    np.testing.assert_allclose([r["loss"] for r in ddp_log], [r["loss"] for r in single_log], rtol=1e-5)
    # Evaluation counts were summed over ranks (each rank saw one of the two val frames):
    # the logged metric is that of one process evaluating the saved model on both frames.
    assert ddp_log[-1]["eval_mean_iou"] == pytest.approx(_mean_iou(tmp_path / "ddp", frames), abs=1e-9)
    # Rank 0 alone wrote, and it saved both ranks' RNG states.
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step-00000003.pt", weights_only=False)
    assert len(state["rng"]) == 2 and state["world_size"] == 2


def test_nan_loss_stops_with_a_clear_message(frames, segformer_config, tmp_path, capsys, monkeypatch) -> None:
    from omniseg.models.segformer import SegformerForSemanticSegmentation

    monkeypatch.setattr(SegformerForSemanticSegmentation, "loss", lambda self, logits, labels: logits.sum() * float("nan"))
    status = train("--model", segformer_config, "--data", frames, "--out", tmp_path / "nan", "--max-steps", "2", *FAST)
    assert status == 1
    err = capsys.readouterr().err
    assert "loss became nan at step 1" in err and "Lower --lr" in err


def test_bad_label_file_is_named(frames, tmp_path) -> None:
    from omniseg.data.dataset import SegmentationDataset, folder_samples

    root = tmp_path / "bad"
    for kind in ("images", "labels"):
        (root / kind / "train").mkdir(parents=True)
    image = sorted((frames / "images" / "train").iterdir())[0]
    (root / "images" / "train" / image.name).symlink_to(image.resolve())
    (root / "labels" / "train" / image.name).write_bytes(b"not a png")
    dataset = SegmentationDataset(folder_samples(root, "train"), num_labels=11, ignore_index=11)
    with pytest.raises(InputError, match="bad/labels/train"):
        dataset[0]
    Image.fromarray(np.full((360, 480), 40, dtype=np.uint8)).save(root / "labels" / "train" / image.name)
    with pytest.raises(InputError, match=r"label values \[40\] are outside the 11 classes"):
        dataset[0]


def test_bad_sample_in_a_worker_process_is_reported_with_its_file(frames, segformer_config, tmp_path, capsys) -> None:
    root = tmp_path / "data"
    for kind in ("images", "labels"):
        (root / kind / "train").mkdir(parents=True)
    for image in sorted((frames / "images" / "train").iterdir()):
        (root / "images" / "train" / image.name).symlink_to(image.resolve())
        (root / "labels" / "train" / image.name).write_bytes(b"truncated")
    (root / "id2label.json").write_text((frames / "id2label.json").read_text())
    status = train("--model", segformer_config, "--data", root, "--out", tmp_path / "out", "--max-steps", "1",
                   "--num-workers", "1", *FAST)
    assert status == 1
    err = capsys.readouterr().err
    assert "loading a sample failed" in err and str(root / "labels" / "train") in err


def test_epochs_set_the_run_length_and_the_schedule_reaches_zero(frames, segformer_config, tmp_path) -> None:
    out = tmp_path / "epochs"
    assert train("--model", segformer_config, "--data", frames, "--out", out, "--epochs", "2", "--batch-size", "2",
                 "--warmup-steps", "1", *FAST) == 0
    log = read_log(out)
    # "epoch" is the epoch a step's batches came from; "lr" the rate the step used
    # (1 warm-up step from 1e-3 x peak, then linear decay towards 0 at step 4).
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["epoch"] for r in log] == [0, 0, 1, 1]
    assert [r["lr"] for r in log] == pytest.approx([1e-7, 1e-4, 2e-4 / 3, 1e-4 / 3])
    assert json.loads((out / "trainer_state.json").read_text())["total_steps"] == 4


def test_semantic_aux_loss_resumes_exactly_and_leaves_the_saved_model_plain(frames, mask2former_dir, tmp_path, capsys) -> None:
    """``--semantic-aux-weight``: the training-only head adds its cross-entropy to the loss, its
    weights and optimiser state travel in checkpoints (a cut-and-resumed run equals the
    uninterrupted one bit for bit), and the saved model has exactly the plain model's tensors."""
    common = ["--model", mask2former_dir, "--data", frames, "--max-steps", "4", "--batch-size", "2",
              "--lr", "1e-3", "--checkpoint-every", "1", *FAST]
    weight = 2.0
    aux = ["--semantic-aux-weight", str(weight)]
    assert train(*common, "--out", tmp_path / "plain") == 0
    assert train(*common, *aux, "--out", tmp_path / "full") == 0
    assert train(*common, *aux, "--out", tmp_path / "cut", "--stop-at-step", "2") == 0
    assert train(*common, *aux, "--out", tmp_path / "cut", "--resume") == 0
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "cut"))
    assert [r["loss"] for r in read_log(tmp_path / "full")] == [r["loss"] for r in read_log(tmp_path / "cut")]

    # Same data, same sampled points at step 1 (building the head leaves the RNG alone): the
    # difference is the weighted cross-entropy of a fresh head, about weight * ln(11 classes).
    extra = read_log(tmp_path / "full")[0]["loss"] - read_log(tmp_path / "plain")[0]["loss"]
    assert 0.5 * weight * np.log(11) < extra < 2.0 * weight * np.log(11), extra
    assert weights(tmp_path / "full").keys() == weights(tmp_path / "plain").keys()
    assert not torch.equal(weights(tmp_path / "full")["class_predictor.weight"],
                           weights(tmp_path / "plain")["class_predictor.weight"])

    # A checkpoint written without the head cannot silently continue with one.
    assert train(*common, *aux, "--out", tmp_path / "plain", "--resume") == 1
    assert "--semantic-aux-weight" in capsys.readouterr().err


# Runs ``omniseg train`` under torchrun and saves each rank's auxiliary head (before and
# after training) and model parameters (only rank 0 writes checkpoints, so rank 1's would be unseen).
_RANK_STATE_RUNNER = """
import os, sys, torch
from omniseg.cli.main import main
from omniseg.train.trainer import Trainer

run = Trainer.train

def train_and_save_rank_state(self):
    initial = {"initial_aux." + k: v.clone() for k, v in self.semantic_aux.state_dict().items()}
    summary = run(self)
    state = {"aux." + k: v for k, v in self.semantic_aux.state_dict().items()}
    state.update(initial)
    state.update({"model." + k: v for k, v in self.model.state_dict().items()})
    torch.save(state, os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
    return summary

Trainer.train = train_and_save_rank_state
sys.exit(main(sys.argv[2:]))
"""


def test_semantic_aux_head_stays_identical_on_every_rank(frames, mask2former_dir, tmp_path) -> None:
    """Under ``torchrun`` the auxiliary head lives outside DDP and the trainer averages its
    gradients itself: each rank sees other images, yet both ranks start from and end with
    the same head (and the same model), and the head has moved from its initialisation."""
    runner = tmp_path / "runner.py"
    runner.write_text(_RANK_STATE_RUNNER)
    common = ["--model", str(mask2former_dir), "--data", str(frames), "--max-steps", "3", "--batch-size", "2",
              "--lr", "1e-3", "--eval-every", "3", "--semantic-aux-weight", "2.0", *FAST]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29519",
         str(runner), str(tmp_path), "train", *common, "--out", str(tmp_path / "ddp")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.startswith("aux.") for k in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    head = [k for k in rank0 if k.startswith("aux.")]
    assert all(not torch.equal(rank0[k], rank0["initial_" + k]) for k in head)


# ---------------------------------------------------------------------------- by group, EMA, time budget


def test_holdout_group_trains_on_the_others_and_evaluates_on_it_only(frames, mask2former_dir, tmp_path, capsys) -> None:
    """CamVid names start with their drive: the 4 train frames are 0001TP, the 2 val ones
    0016E5. Holding 0016E5 out of train+val trains on 0001TP and scores on 0016E5 alone."""
    out = tmp_path / "holdout"
    assert train("--model", mask2former_dir, "--data", frames, "--out", out, "--max-steps", "2",
                 "--batch-size", "2", "--train-split", "train,val", "--eval-split", "train,val",
                 "--group-by", "^([^_]+)_", "--holdout-groups", "0016E5", "--eval-every", "2", *FAST) == 0
    err = capsys.readouterr().err
    assert "training groups: {'0001TP': 4}; evaluation groups: {'0016E5': 2}" in err
    # The evaluation covered exactly the held-out frames (the val split here).
    assert read_log(out)[-1]["eval_mean_iou"] == pytest.approx(_mean_iou(out, frames), abs=1e-6)

    assert train("--model", mask2former_dir, "--data", frames, "--out", tmp_path / "typo", "--max-steps", "1",
                 "--group-by", "^([^_]+)_", "--holdout-groups", "0016E6", *FAST) == 1
    assert "no samples in group(s) 0016E6" in capsys.readouterr().err
    assert train("--model", mask2former_dir, "--data", frames, "--out", tmp_path / "nogroup", "--max-steps", "1",
                 "--holdout-groups", "0016E5", *FAST) == 1
    assert "--holdout-groups needs --group-by" in capsys.readouterr().err


def test_ema_weights_are_saved_and_resume_needs_the_same_setting(frames, mask2former_dir, tmp_path, capsys) -> None:
    out = tmp_path / "ema"
    common = ["--model", mask2former_dir, "--data", frames, "--out", out, "--batch-size", "2", "--lr", "1e-3",
              "--checkpoint-every", "1", *FAST]
    assert train(*common, "--max-steps", "3", "--ema-decay", "0.5") == 0
    from omniseg.train import checkpointing

    state = checkpointing.load_checkpoint(checkpointing.latest_checkpoint(out))
    saved = weights(out)
    common_keys = saved.keys() & state["ema"].keys()
    assert len(common_keys) > 100
    assert_same_weights({k: saved[k] for k in common_keys}, {k: state["ema"][k] for k in common_keys})
    changed = [k for k in common_keys if not torch.equal(saved[k], state["model"][k])]
    assert len(changed) > 10  # the average lags the trained weights
    assert train(*common, "--max-steps", "4", "--resume") == 1
    assert "resume with the same --ema-decay setting" in capsys.readouterr().err


def test_time_budget_fits_the_schedule_to_the_measured_step_time(frames, mask2former_dir, tmp_path, monkeypatch) -> None:
    import types

    from omniseg.train import trainer
    from omniseg.train.trainer import Trainer

    # A clock that ticks per reading, so the fitted length does not depend on the machine's load.
    ticks = iter(range(10**6))
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 0.01))
    monkeypatch.setattr(Trainer, "_BUDGET_CLOCK", (2, 4))
    out = tmp_path / "budget"
    assert train("--model", mask2former_dir, "--data", frames, "--out", out, "--time-budget", "0.3",
                 "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "4", *FAST) == 0
    total = json.loads((out / "trainer_state.json").read_text())["total_steps"]
    log = read_log(out)
    assert 4 < total < 500 and log[-1]["step"] == total
    # The poly schedule was laid over the fitted length: it ends near zero.
    assert log[-1]["lr"] < 0.2 * max(r["lr"] for r in log)


def test_class_balance_weighs_rare_classes_up(frames, mask2former_dir, tmp_path, capsys) -> None:
    assert train("--model", mask2former_dir, "--data", frames, "--out", tmp_path / "cb", "--max-steps", "1",
                 "--batch-size", "2", "--semantic-aux-weight", "1", "--class-balance", *FAST) == 0
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("class weights:"))
    weights_by_name = {name: float(w) for name, w in (item.rsplit(" ", 1) for item in line[15:].split(", "))}
    assert weights_by_name["road"] < 1.0 < weights_by_name["pole"]
    assert train("--model", mask2former_dir, "--data", frames, "--out", tmp_path / "cb2", "--max-steps", "1",
                 "--class-balance", *FAST) == 1


def test_amp_on_the_cpu_trains_in_bfloat16_and_evaluates_in_float32(frames, mask2former_dir, tmp_path, monkeypatch) -> None:
    """--amp: bfloat16 autocast for the training steps on the CPU; evaluation stays float32
    (the pipeline's numbers); without it the CPU trains in float32."""
    from omniseg.models.mask2former import Mask2FormerForUniversalSegmentation

    seen: list[tuple[bool, bool, torch.dtype]] = []
    forward = Mask2FormerForUniversalSegmentation.forward

    def recording_forward(self, *args, **kwargs):
        seen.append((self.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Mask2FormerForUniversalSegmentation, "forward", recording_forward)
    common = ["--model", mask2former_dir, "--data", frames, "--max-steps", "2", "--batch-size", "2",
              "--eval-every", "2", *FAST]
    assert train(*common, "--amp", "--out", tmp_path / "amp") == 0
    assert {(autocast, dtype) for training, autocast, dtype in seen if training} == {(True, torch.bfloat16)}
    assert {autocast for training, autocast, _ in seen if not training} == {False}
    losses = [r["loss"] for r in read_log(tmp_path / "amp")]
    assert len(losses) == 2 and all(np.isfinite(losses))

    seen.clear()
    assert train(*common, "--out", tmp_path / "float32") == 0
    assert seen and not any(autocast for _, autocast, _ in seen)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-steps", "0", "must be at least 1"),  # used to "finish at step 0/0" with exit 0
        ("--max-steps", "-3", "must be at least 1"),
        ("--epochs", "0", "must be at least 1"),
        ("--lr", "-1", "must be above 0"),  # used to be a traceback from the optimizer
        ("--batch-size", "0", "must be at least 1"),  # used to be a traceback from TrainingArguments
        ("--ema-decay", "1", "must be below 1"),
        ("--time-budget", "0", "must be above 0"),
        ("--log-every", "0", "must be at least 1"),
        ("--ignore-index", "-1", "must be at least 0"),
    ],
)
def test_bad_numbers_are_usage_errors_naming_the_option(tmp_path, capsys, option, value, message) -> None:
    with pytest.raises(SystemExit) as info:
        train("--model", tmp_path / "m", "--data", tmp_path / "d", "--out", tmp_path / "out", option, value)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err
    assert not (tmp_path / "out").exists()


def test_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Used to be a RuntimeError traceback from init_distributed.
    assert train("--model", tmp_path / "m", "--data", tmp_path / "d", "--out", tmp_path / "out", "--device", "cuda") == 1
    assert "omniseg train: error: --device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_unwritable_out_is_named_before_anything_loads(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    # Used to be a NotADirectoryError traceback once the data and the model had loaded.
    assert train("--model", tmp_path / "m", "--data", tmp_path / "d", "--out", tmp_path / "file" / "sub") == 1
    err = capsys.readouterr().err
    assert "omniseg train: error: --out" in err and "is a file" in err


def test_resuming_a_finished_run_says_so_instead_of_loss_nan(frames, segformer_config, tmp_path, capsys) -> None:
    common = ["--model", segformer_config, "--data", frames, "--out", tmp_path / "run", "--max-steps", "1", *FAST]
    assert train(*common) == 0
    capsys.readouterr()
    assert train(*common, "--resume") == 0
    out = capsys.readouterr().out
    assert "finished at step 1/1, no step left to train" in out and "nan" not in out


def test_a_new_run_over_an_earlier_one_says_resume_exists(frames, segformer_config, tmp_path, capsys) -> None:
    common = ["--model", segformer_config, "--data", frames, "--out", tmp_path / "run", "--max-steps", "1", *FAST]
    assert train(*common) == 0
    assert "earlier run" not in capsys.readouterr().err
    # Used to start over in silence (the usual slip after a crash: --resume forgotten).
    assert train(*common) == 0
    err = capsys.readouterr().err
    assert "holds an earlier run (latest: step-00000001.pt)" in err and "--resume" in err
    assert train(*common, "--resume") == 0
    assert "earlier run" not in capsys.readouterr().err


def test_errors_name_the_option_they_come_from(frames, tmp_path, capsys) -> None:
    # Used to be "omniseg train: error: /.../nope: no such directory", which option unsaid.
    assert train("--model", tmp_path / "nope", "--data", frames, "--out", tmp_path / "out", "--max-steps", "1") == 1
    assert f"omniseg train: error: --model: {tmp_path / 'nope'}: no such directory" in capsys.readouterr().err
    assert train("--model", tmp_path / "nope", "--data", tmp_path / "nodata", "--out", tmp_path / "out") == 1
    assert f"omniseg train: error: --data: {tmp_path / 'nodata'}: dataset folder not found" in capsys.readouterr().err


def test_copy_paste_trains_and_names_unknown_classes(frames, mask2former_dir, tmp_path, capsys) -> None:
    assert train("--model", mask2former_dir, "--data", frames, "--out", tmp_path / "cp", "--max-steps", "1",
                 "--batch-size", "2", "--panoptic", "--copy-paste", "pole,pedestrian", "--copy-paste-prob", "1",
                 *FAST) == 0
    assert read_log(tmp_path / "cp")[-1]["step"] == 1
    assert train("--model", mask2former_dir, "--data", frames, "--out", tmp_path / "cp2", "--max-steps", "1",
                 "--copy-paste", "pole,lamppost", *FAST) == 1
    err = capsys.readouterr().err
    assert "--copy-paste" in err and "lamppost" in err
    assert train("--model", mask2former_dir, "--data", frames, "--out", tmp_path / "cp3", "--max-steps", "1",
                 "--copy-paste-prob", "0.3", *FAST) == 1
    assert "--copy-paste-prob needs --copy-paste" in capsys.readouterr().err
