"""Small conversions between Python values and well-known protobuf types."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp(value: datetime) -> Timestamp:
    """A `google.protobuf.Timestamp` for a timezone-aware datetime."""
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
