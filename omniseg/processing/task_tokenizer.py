"""OneFormer's task text ("the task is semantic") as token ids, read with the ``tokenizers`` library.

A OneFormer checkpoint ships a CLIP tokenizer: ``tokenizer.json`` (a complete ``tokenizers``
pipeline, loaded as is) or the older ``vocab.json`` + ``merges.txt``, from which the CLIP
byte-level BPE pipeline is assembled with ``tokenizers``' own components (lower-cased NFC
text, CLIP's word split, byte-level BPE with ``</w>`` word ends, start/end tokens), as the
reference's ``CLIPTokenizer`` assembles it. Special tokens come from ``tokenizer_config.json``
/ ``special_tokens_map.json`` (CLIP's defaults otherwise). The files are kept verbatim so that
a saved processor carries them unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from omniseg.errors import CheckpointError
from omniseg.io.atomic import atomic_write_bytes

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")

# CLIPTokenizer's defaults.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# CLIP's word split (contractions, letters, single digits, other symbol runs).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise CheckpointError(
            "tokenizers",
            "OneFormer needs the 'tokenizers' package for its task inputs: pip install 'omniseg[oneformer]'",
        ) from None
    return tokenizers


def _token_content(value: Any) -> str | None:
    """A special token as saved: a string, or a dict with ``content`` (AddedToken form)."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class TaskTokenizer:
    """Token ids of task texts, padded to a fixed length.

    Example::

        tokenizer = TaskTokenizer.from_directory(model_dir)
        ids, mask = tokenizer(["the task is semantic"], length=77)  # [1, 77] each
    """

    def __init__(self, *, tokenizer: Any, pad_token: str, files: dict[str, bytes]) -> None:
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self._tokenizer = tokenizer
        self.pad_token = pad_token
        self.pad_token_id = int(pad_id)
        self.files = files

    @classmethod
    def from_directory(cls, directory: str | Path) -> "TaskTokenizer":
        """Read the tokenizer files of a model directory (see the module doc); raises
        :class:`CheckpointError` naming the directory when they are missing or unusable."""
        tokenizers = _import_tokenizers()
        directory = Path(directory)
        files = {
            name: (directory / name).read_bytes()
            for name in (TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE, *CONFIG_FILES)
            if (directory / name).is_file()
        }
        special = dict(DEFAULT_SPECIAL_TOKENS)
        for name in CONFIG_FILES:
            if name in files:
                settings = _read_json_bytes(directory / name, files[name])
                special.update({k: _token_content(settings[k]) for k in DEFAULT_SPECIAL_TOKENS if settings.get(k)})
        if TOKENIZER_FILE not in files and not (VOCAB_FILE in files and MERGES_FILE in files):
            raise CheckpointError(
                directory,
                f"no tokenizer for the task inputs (expected {TOKENIZER_FILE}, or {VOCAB_FILE} and {MERGES_FILE})",
            )
        try:
            if TOKENIZER_FILE in files:
                tokenizer = tokenizers.Tokenizer.from_str(files[TOKENIZER_FILE].decode("utf-8"))
            else:
                tokenizer = _clip_tokenizer(tokenizers, directory, files, special)
            return cls(tokenizer=tokenizer, pad_token=special["pad_token"], files=files)
        except CheckpointError:
            raise
        except Exception as exc:  # tokenizers reports unreadable files as plain Exceptions
            raise CheckpointError(directory, f"unusable tokenizer files ({exc})") from exc

    def __call__(
        self, texts: Sequence[str], *, length: int, truncate: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (start and end tokens added) of each text, padded with the pad token.

        Args:
            texts: ``B`` strings.
            length: padded length; with ``truncate``, longer texts are cut to it (the end
                token kept), otherwise they stay longer (and a batch pads to the longest).

        Returns:
            ``input_ids [B, L]`` and ``attention_mask [B, L]`` (1 on real tokens), int64.
        """
        if truncate:
            self._tokenizer.enable_truncation(length)
        else:
            self._tokenizer.no_truncation()
        self._tokenizer.no_padding()  # padded below, to the longer of length and the texts
        encodings = self._tokenizer.encode_batch(list(texts))
        longest = max([length] + [len(e.ids) for e in encodings])
        ids = torch.full((len(encodings), longest), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(encodings), longest), dtype=torch.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids, dtype=torch.int64)
            mask[row, : len(encoding.ids)] = torch.tensor(encoding.attention_mask, dtype=torch.int64)
        return ids, mask

    def save(self, directory: str | Path) -> None:
        """Write the files it was read from, unchanged (atomically)."""
        for name, data in self.files.items():
            atomic_write_bytes(Path(directory) / name, data)


def _read_json_bytes(path: Path, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"not a readable JSON file ({exc})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(path, "expected a JSON object at the top level")
    return value


def _clip_tokenizer(tokenizers: Any, directory: Path, files: dict[str, bytes], special: dict[str, str]) -> Any:
    """CLIP's byte-level BPE pipeline from ``vocab.json`` and ``merges.txt``."""
    vocab = _read_json_bytes(directory / VOCAB_FILE, files[VOCAB_FILE])
    merges = [
        tuple(line.split())
        for line in files[MERGES_FILE].decode("utf-8").splitlines()
        if line.strip() and not line.startswith("#version")
    ]
    tokenizer = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=special["unk_token"],
        )
    )
    tokenizer.normalizer = tokenizers.normalizers.Sequence(
        [
            tokenizers.normalizers.NFC(),
            tokenizers.normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
            tokenizers.normalizers.Lowercase(),
        ]
    )
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(CLIP_SPLIT), behavior="removed", invert=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    bos, eos = special["bos_token"], special["eos_token"]
    for token in (bos, eos):
        if tokenizer.token_to_id(token) is None:
            raise CheckpointError(directory / VOCAB_FILE, f"special token {token!r} is not in the vocabulary")
    tokenizer.post_processor = tokenizers.processors.RobertaProcessing(
        (eos, tokenizer.token_to_id(eos)), (bos, tokenizer.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
    )
    return tokenizer
