"""The embedded platform of the training tests (datasets, adapters, training, inference on one
server, the tiny chat model as `colours`)."""

from tests.training.conftest import (
    big_model,
    chat_model,
    make_platform,
    platform_settings,
    s3_endpoint,
    tool_model,
)

__all__ = [
    "big_model",
    "chat_model",
    "make_platform",
    "platform_settings",
    "s3_endpoint",
    "tool_model",
]
