"""Images on any filesystem pyarrow supports (``s3://``, ``gs://``, ``hdfs://``, ``file://``).

Local paths and http(s) URLs are read by :func:`omniseg.io.images.load_image`; other URIs
are listed and read here through ``pyarrow.fs``, with the user's own configuration (for
S3: the usual AWS environment variables, profile or instance role).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from omniseg.errors import ImageReadError
from omniseg.io.images import IMAGE_EXTENSIONS

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_uri(text: str) -> bool:
    """``scheme://...`` other than http(s), which :func:`~omniseg.io.images.load_image` fetches itself."""
    match = _SCHEME.match(str(text))
    return match is not None and match.group(1).lower() not in ("http", "https")


def list_image_uris(uri: str) -> list[tuple[str, PurePosixPath]]:
    """The image files a URI names: ``(file URI, path relative to the named folder)``.

    A folder is walked recursively in sorted order for known image extensions, skipping
    hidden entries (as local folders are walked); a file, or a URI that does not exist,
    is kept as named (relative path: its name), so that reading it reports what is wrong.
    """
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(uri)
    prefix = uri[: _SCHEME.match(uri).end()]
    info = filesystem.get_file_info(root)
    if info.type != fs.FileType.Directory:
        return [(uri, PurePosixPath(PurePosixPath(root).name))]
    found = []
    for entry in filesystem.get_file_info(fs.FileSelector(root, recursive=True)):
        relative = PurePosixPath(entry.path).relative_to(PurePosixPath(root))
        if (
            entry.type == fs.FileType.File
            and not any(part.startswith(".") for part in relative.parts)
            and relative.suffix.lower() in IMAGE_EXTENSIONS
        ):
            found.append((prefix + entry.path, relative))
    return sorted(found, key=lambda pair: pair[1].parts)


def read_uri(uri: str) -> bytes:
    """The bytes of the file at ``uri``.

    Raises:
        ImageReadError: the file does not exist, is a folder, or cannot be read.
    """
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            raise ImageReadError(uri, "file not found")
        if info.type == fs.FileType.Directory:
            raise ImageReadError(uri, "is a directory, not an image file")
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, ValueError) as exc:  # pyarrow's errors for unknown schemes, access, network
        raise ImageReadError(uri, f"cannot read: {exc}") from exc
