"""What the SDK's service modules share: resource names, messages given as dicts, and reading
upload sources in chunks with progress."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeAlias, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from tunefleet.client.errors import InvalidArgument

CHUNK_BYTES = 1024 * 1024
# What an upload reads: a path, an open binary file, or the bytes themselves.
Source: TypeAlias = str | os.PathLike[str] | IO[bytes] | bytes
# Called as bytes are sent or received: (done, total); total is None when unknown.
Progress: TypeAlias = Callable[[int, int | None], None]
MessageT = TypeVar("MessageT", bound=Message)


def resource_name(collection: str, value: str) -> str:
    """`value` as a resource name of `collection`: "ab12" and "datasets/ab12" both give
    "datasets/ab12"."""
    return value if value.startswith(f"{collection}/") else f"{collection}/{value}"


def to_message(cls: type[MessageT], value: MessageT | Mapping[str, Any], field: str) -> MessageT:
    """A message given as itself or as a dict in the protobuf JSON form."""
    if isinstance(value, cls):
        return value
    try:
        return json_format.ParseDict(dict(value), cls())  # type: ignore[arg-type]
    except (json_format.ParseError, TypeError, ValueError) as error:
        raise InvalidArgument(f"{field}: {error}", field=field) from None


def chunks(
    source: Source, chunk_size: int, on_progress: Progress | None
) -> tuple[Iterator[bytes], int | None, str]:
    """The bytes of `source` in chunks, its size when known, and a name for it."""
    if isinstance(source, bytes):
        file: IO[bytes] = io.BytesIO(source)
        size: int | None = len(source)
        name = ""
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        file = path.open("rb")
        size, name = path.stat().st_size, path.name
    else:
        file, name = source, Path(getattr(source, "name", "") or "").name
        try:
            size = os.fstat(source.fileno()).st_size - source.tell()
        except (OSError, AttributeError, io.UnsupportedOperation):
            size = None

    def read() -> Iterator[bytes]:
        done = 0
        try:
            while chunk := file.read(chunk_size):
                done += len(chunk)
                yield chunk
                if on_progress:
                    on_progress(done, size)
        finally:
            if file is not source:
                file.close()

    return read(), size, name
