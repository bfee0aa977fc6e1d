"""The embedded platform of the training tests (datasets, adapters, training, evaluation and,
given a base model, inference on one server; the tiny chat model as `colours`)."""

from tests.training.conftest import big_model, chat_model, make_platform, platform_settings

__all__ = ["big_model", "chat_model", "make_platform", "platform_settings"]
