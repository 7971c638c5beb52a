"""Resolving a model name to a local directory: a path, or a hub repository id."""

from __future__ import annotations

import os
from pathlib import Path

from omniseg.errors import ModelNotFoundError

# What a segmentation checkpoint needs; nothing else is downloaded.
CHECKPOINT_FILES = [
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    # OneFormer's task-text tokenizer and its processor settings.
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "processor_config.json",
]
LEGACY_WEIGHTS = "pytorch_model.bin"


def resolve_model_dir(name_or_path: str | Path, *, revision: str | None = None) -> Path:
    """Return a local directory holding the checkpoint ``name_or_path``.

    A path that exists is used as is. Anything else is taken as a hub repository id and
    fetched with ``huggingface_hub`` into its standard cache; ``HF_HUB_OFFLINE=1`` is
    honoured, and a repository that is neither reachable nor cached raises
    :class:`ModelNotFoundError` saying so.

    Raises:
        TypeError: ``name_or_path`` is neither a string nor a path (a model object, say).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        # Else pathlib's "expected str, bytes or os.PathLike object, not ...", naming no argument.
        hint = ""
        if hasattr(name_or_path, "state_dict"):
            hint = (
                "; to run a model already loaded, build "
                "omniseg.pipelines.image_segmentation.ImageSegmentationPipeline(model=model, processor=processor)"
            )
        raise TypeError(
            f"model: expected a checkpoint directory (str or path) or a hub id (str), "
            f"got {type(name_or_path).__name__}{hint}"
        )
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(path, "a model must be a directory holding config.json")
        return path
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(name, "no such directory")
    return _download(name, revision=revision)


def _download(repo_id: str, *, revision: str | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        directory = Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES
            )
        )
        if not any(directory.glob("*.safetensors")):
            directory = Path(
                huggingface_hub.snapshot_download(
                    repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES + [LEGACY_WEIGHTS]
                )
            )
    except HFValidationError:
        raise ModelNotFoundError(repo_id, "neither a local directory nor a valid hub repository id") from None
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            repo_id,
            "not a local directory, and the hub cannot be reached (offline mode or no network) "
            "and the repository is not in the local cache; download it once when online, "
            "or pass the path of a local checkpoint directory",
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise ModelNotFoundError(repo_id, "no such repository on the hub, or it needs authentication") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(repo_id, f"revision {revision!r} not found on the hub") from None
    except OSError as exc:
        raise ModelNotFoundError(repo_id, f"download failed ({exc})") from exc
    return directory
