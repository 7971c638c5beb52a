"""omniseg's typed errors survive pickling (Ray actors, multiprocessing workers)."""

from __future__ import annotations

import pickle

import pytest

from omniseg import errors


@pytest.mark.parametrize(
    "kind",
    [errors.InputError, errors.ImageReadError, errors.ImageTooLargeError, errors.UnsupportedImageError,
     errors.PromptError, errors.CheckpointError, errors.ModelNotFoundError, errors.UnsupportedModelError],
)
def test_errors_pickle_with_their_type_source_and_reason(kind) -> None:
    """Ray sends an actor's exception to the driver pickled; these errors used to fail to
    unpickle (``__init__`` wants source and reason, pickling gave it the message), and the
    user read Ray's "UnserializableException: Failed to deserialize exception" instead."""
    error = kind("photos/a.png", "image file is truncated")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is kind
    assert (copy.source, copy.reason, str(copy)) == ("photos/a.png", "image file is truncated", str(error))
