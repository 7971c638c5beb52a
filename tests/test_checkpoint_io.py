"""Checkpoint IO shared by every architecture: configs, strict loading, hub resolution."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from omniseg.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from omniseg.hub import resolve_model_dir
from omniseg.models.auto import load_model
from omniseg.models.base import PretrainedModel
from omniseg.models.checkpoint import read_state_dict
from omniseg.models.config import ModelConfig


@dataclasses.dataclass
class TinyConfig(ModelConfig):
    model_type = "tiny-test"
    width: int = 4


class TinyModel(PretrainedModel):
    config_class = TinyConfig
    architecture = "TinyModel"

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.width, 2)
        self.norm = nn.BatchNorm1d(2)


@pytest.fixture
def saved_tiny(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = TinyModel(TinyConfig(width=4, id2label={0: "a", 1: "b"}, extra={"custom_key": [1, 2]}))
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_config_keeps_unknown_keys_and_derives_label2id(saved_tiny: Path) -> None:
    data = json.loads((saved_tiny / "config.json").read_text())
    assert data["custom_key"] == [1, 2]
    assert data["id2label"] == {"0": "a", "1": "b"}
    assert data["label2id"] == {"a": 0, "b": 1}
    assert data["architectures"] == ["TinyModel"]
    config = TinyConfig.from_dict(data)
    assert config.id2label == {0: "a", 1: "b"} and config.width == 4
    assert config.to_dict() == data


def test_save_and_load_round_trip_is_exact(saved_tiny: Path) -> None:
    original = read_state_dict(saved_tiny)
    loaded = TinyModel.from_pretrained(saved_tiny)
    assert not loaded.training
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert not list(saved_tiny.glob("*.tmp")) and not list(saved_tiny.glob(".*"))


def test_legacy_pytorch_weights_load(saved_tiny: Path, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((saved_tiny / "config.json").read_text())
    torch.save(read_state_dict(saved_tiny), legacy / "pytorch_model.bin")
    model = TinyModel.from_pretrained(legacy)
    assert torch.equal(model.proj.weight, read_state_dict(saved_tiny)["proj.weight"])


def test_strict_loading_lists_every_problem(saved_tiny: Path) -> None:
    from safetensors.torch import save_file

    state = read_state_dict(saved_tiny)
    del state["proj.bias"]
    state["stray.weight"] = torch.zeros(1)
    state["norm.weight"] = torch.zeros(3)
    save_file(state, str(saved_tiny / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        TinyModel.from_pretrained(saved_tiny)
    message = str(info.value)
    assert str(saved_tiny) in message
    assert "missing tensors: proj.bias" in message
    assert "unexpected tensors: stray.weight" in message
    assert "norm.weight: checkpoint (3,) vs model (2,)" in message


@pytest.mark.parametrize("content", [b"", b"not safetensors at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
def test_corrupt_weights_name_the_file(saved_tiny: Path, content: bytes) -> None:
    (saved_tiny / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        TinyModel.from_pretrained(saved_tiny)


def test_missing_weights_and_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights found"):
        read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON file"):
        load_model(tmp_path)


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported"):
        load_model(tmp_path)


def test_pickled_code_is_refused(saved_tiny: Path, tmp_path: Path) -> None:
    legacy = tmp_path / "evil"
    legacy.mkdir()
    (legacy / "config.json").write_text((saved_tiny / "config.json").read_text())
    torch.save({"proj.weight": torch.zeros(2, 4), "payload": object()}, legacy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read PyTorch weights"):
        TinyModel.from_pretrained(legacy)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_offline_and_not_cached_is_a_clear_error(offline_hub: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir("someone/some-segmentation-model")
    assert "someone/some-segmentation-model" in str(info.value)
    assert "offline" in str(info.value) and "not in the local cache" in str(info.value)


def test_hub_id_offline_uses_the_standard_cache(offline_hub: Path, saved_tiny: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--someone--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((saved_tiny / name).read_bytes())
    assert resolve_model_dir("someone/tiny") == snapshot
    model = TinyModel.from_pretrained("someone/tiny")
    assert torch.equal(model.proj.weight, read_state_dict(saved_tiny)["proj.weight"])


def test_local_paths_that_do_not_exist_are_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="must be a directory"):
        (tmp_path / "file.txt").write_text("x")
        resolve_model_dir(tmp_path / "file.txt")


def test_the_default_install_has_the_fast_kernels():
    """numba is a runtime dependency (the README's main command installs the fast path), and
    the installed omniseg's metadata says so; the PyTorch fallbacks are tested separately
    (the kernel tests run both paths)."""
    import re
    import tomllib
    from importlib import metadata

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"numba\b", requirement) for requirement in project["dependencies"])
    assert "fast" not in project.get("optional-dependencies", {})
    installed = [r for r in metadata.requires("omniseg") or [] if re.match(r"numba\b", r)]
    assert installed and "extra ==" not in installed[0], installed
    from omniseg.ops._numba import kernels_apply

    assert kernels_apply()  # numba imported on this machine


@pytest.fixture
def bundled_copy(tmp_path: Path) -> Path:
    """The bundled Mask2Former's files, config and processor settings copied to be edited."""
    from omniseg.assets import default_model_dir

    source = default_model_dir()
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (copy / name).write_text((source / name).read_text())
    (copy / "model.safetensors").symlink_to(source / "model.safetensors")
    return copy


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # Each was a raw error from deep inside: torch's "empty(): argument 'size' ...",
        # "'list' object has no attribute 'items'", "unhashable type: 'list'".
        ({"num_queries": "many"}, r"config.json: num_queries must be an integer, got 'many'"),
        ({"dropout": [0.1]}, r"config.json: dropout must be a number, got \[0.1\]"),
        ({"feature_strides": 4}, r"config.json: feature_strides must be a list, got 4"),
        ({"id2label": ["road", "sky"]}, r"config.json: id2label must map class ids to names"),
        ({"id2label": {"road": "sky"}}, r"config.json: id2label keys must be class ids"),
        ({"model_type": ["mask2former"]}, r"config.json: model_type \['mask2former'\] is not supported"),
        ({"model_type": None}, r"config.json: no model_type \(supported: detr, mask2former"),
        # The right types, yet no model can have them: named as the config's problem.
        ({"hidden_dim": 130}, r"config.json: cannot build Mask2FormerForUniversalSegmentation from this config"),
    ],
)
def test_unusable_config_values_name_the_file_and_key(bundled_copy: Path, changes: dict, message: str) -> None:
    import omniseg

    _edit_json(bundled_copy / "config.json", **changes)
    with pytest.raises(CheckpointError, match=message):
        load_model(bundled_copy)
    with pytest.raises(CheckpointError, match=message):
        omniseg.pipeline("image-segmentation", model=bundled_copy)


def test_lenient_where_published_configs_are(bundled_copy: Path) -> None:
    # JSON writers differ: 0/1 for booleans, 0 for a float.
    _edit_json(bundled_copy / "config.json", pre_norm=0, dropout=0)
    assert load_model(bundled_copy).config.pre_norm == 0


def test_unusable_processor_settings_name_the_file(bundled_copy: Path) -> None:
    from omniseg.models.auto import load_processor

    # Was a bare "ValueError: cannot read size 'big'" naming no file.
    _edit_json(bundled_copy / "preprocessor_config.json", size="big")
    with pytest.raises(CheckpointError, match=r"preprocessor_config.json: unusable image processor settings: .*'big'"):
        load_processor(bundled_copy)


def test_save_into_a_file_or_below_one_names_the_place(tmp_path: Path) -> None:
    from omniseg.processing.base import ImageProcessor

    model = TinyModel(TinyConfig(width=4, id2label={0: "a", 1: "b"}))
    a_file = tmp_path / "weights.txt"
    a_file.write_text("not a folder")
    # Were pathlib's bare FileExistsError / NotADirectoryError from mkdir.
    for saver in (model, ImageProcessor()):
        with pytest.raises(CheckpointError, match=r"weights.txt: cannot save here: it exists and is not a folder"):
            saver.save_pretrained(a_file)
        with pytest.raises(CheckpointError, match=r"weights.txt/sub: cannot save here: .*weights.txt is a file"):
            saver.save_pretrained(a_file / "sub")
    assert a_file.read_text() == "not a folder"


def test_save_where_writing_is_refused_names_the_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    model = TinyModel(TinyConfig(width=4, id2label={0: "a", 1: "b"}))

    # A read-only folder, as a non-root user meets it (root writes anyway, so it is simulated).
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(CheckpointError, match=r"read-only: cannot write there \(Permission denied\)"):
        model.save_pretrained(tmp_path / "read-only")
    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(CheckpointError, match=r"new: cannot create the folder to save into \(Permission denied\)"):
        model.save_pretrained(tmp_path / "new")


def test_a_model_object_or_other_non_path_is_a_type_error_naming_the_argument(saved_tiny: Path) -> None:
    import omniseg

    loaded = TinyModel.from_pretrained(saved_tiny)
    # Was pathlib's "expected str, bytes or os.PathLike object, not TinyModel".
    with pytest.raises(TypeError, match=r"^model: expected a checkpoint directory .* got TinyModel; to run a model already loaded"):
        omniseg.pipeline("image-segmentation", model=loaded)
    for call in (load_model, omniseg.load_processor, lambda m: omniseg.pipeline("mask-generation", model=m)):
        with pytest.raises(TypeError, match=r"^model: expected a checkpoint directory .* got int$"):
            call(5)
