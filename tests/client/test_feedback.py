"""Feedback as training data (`tunefleet.client.feedback`): which feedback becomes which example,
and the examples DatasetService accepts as they are, from feedback recorded on a real server."""

from __future__ import annotations

from typing import Any

import pytest

from tests.training.conftest import (  # noqa: F401 (fixtures)
    big_model,
    chat_model,
    make_platform,
    platform_settings,
)
from tunefleet.client import AsyncClient
from tunefleet.client.feedback import training_examples
from tunefleet.v1 import common_pb2, dataset_pb2, inference_pb2

OWL = inference_pb2.ChatInput(
    messages=[common_pb2.ChatMessage(role="user", content="Which colour goes with the owl?")],
    tools=[common_pb2.Tool(name="colour_of", parameters='{"type": "object"}')],
)


def judged(name: str, rating: float, text: str, corrected: str = "", **input: Any) -> Any:
    response = inference_pb2.RecordedResponse(text=text, finish_reason="stop", **input)
    return inference_pb2.Feedback(
        name=f"feedback/{name}", rating=rating, corrected_text=corrected, response=response
    )


def test_each_kind_of_feedback_makes_its_examples() -> None:
    owl_chat = {"chat": OWL}
    feedback = [
        judged("corrected", -1, "Red.", "Grey.", **owl_chat),
        judged("liked", 1, "Blue.", prompt="The cat is"),
        judged("disliked", -1, "Green.", prompt="The fox is"),
        judged("a", 1, "Grey!", chat=inference_pb2.ChatInput(messages=OWL.messages)),
        judged("b", -0.5, "Pink!", chat=inference_pb2.ChatInput(messages=OWL.messages)),
        judged("ids", -1, "x", "y", prompt_token_ids=inference_pb2.TokenIds(ids=[1, 2])),
        judged("meh", 0, "Brown.", prompt="The bee is"),
    ]
    examples = training_examples(feedback, positive_fraction=1.0)
    owl = {"role": "user", "content": "Which colour goes with the owl?"}
    tools = [
        {
            "type": "function",
            "function": {"name": "colour_of", "description": "", "parameters": {"type": "object"}},
        }
    ]
    assert examples.sft == [
        {"messages": [owl, {"role": "assistant", "content": "Grey."}], "tools": tools},
        {
            "messages": [
                {"role": "user", "content": "The cat is"},
                {"role": "assistant", "content": "Blue."},
            ]
        },
        {"messages": [owl, {"role": "assistant", "content": "Grey!"}]},
    ]
    assert examples.pairs == [
        {
            "prompt": [owl],
            "chosen": [{"role": "assistant", "content": "Grey."}],
            "rejected": [{"role": "assistant", "content": "Red."}],
            "tools": tools,
        },
        {  # the A/B comparison: the same input (without tools), rated apart
            "prompt": [owl],
            "chosen": [{"role": "assistant", "content": "Grey!"}],
            "rejected": [{"role": "assistant", "content": "Pink!"}],
        },
    ]
    assert examples.sources == [f"feedback/{n}" for n in ("a", "b", "corrected", "liked")]
    assert examples.sft_sources == [["feedback/corrected"], ["feedback/liked"], ["feedback/a"]]
    assert examples.pair_sources == [["feedback/corrected"], ["feedback/a", "feedback/b"]]
    assert examples.skipped == {
        "negative_without_correction": 1,
        "token_ids_input": 1,
        "neutral": 1,
    }
    with pytest.raises(ValueError, match="include_responses"):
        training_examples([inference_pb2.Feedback(name="feedback/x", rating=1)])


def test_positive_answers_are_sampled_the_same_way_every_time() -> None:
    feedback = [judged(f"f{i}", 1, "Blue.", prompt=f"The cat {i} is") for i in range(400)]
    first = training_examples(feedback, positive_fraction=0.25, seed=3)
    again = training_examples(reversed(feedback), positive_fraction=0.25, seed=3)
    assert first.sources == again.sources
    assert 70 <= len(first.sft) <= 130
    assert training_examples(feedback, positive_fraction=0.25, seed=4).sources != first.sources
    assert not training_examples(feedback).sft  # none by default


async def test_feedback_on_served_answers_uploads_as_datasets(make_platform: Any) -> None:  # noqa: F811
    """Answers of the served model (to chat and to a raw prompt), rated (some corrected) through
    the SDK, listed with their responses: the SFT examples and the pairs are accepted by
    DatasetService as they are, in one file each."""
    platform = await make_platform(inference={"base_model": "colours"})
    assert platform.server is not None
    async with AsyncClient(f"127.0.0.1:{platform.server.port}") as client:
        animals = ["cat", "owl", "fox", "bee"]
        for index, animal in enumerate(animals):
            messages = [{"role": "user", "content": f"Which colour goes with the {animal}?"}]
            answer = await client.inference.generate(messages=messages, max_tokens=8)
            corrected = f"Colour: {animal}-grey. Done." if index % 2 == 0 else ""
            await client.inference.feedback(
                answer.response_id, rating=-1 if index < 3 else 1, corrected_text=corrected
            )
        completion = await client.inference.generate(prompt="The eel is", max_tokens=8)
        await client.inference.feedback(
            completion.response_id, rating=-1, corrected_text="Colour: eel-blue. Done."
        )
        listed = [f async for f in client.inference.list_feedback(include_responses=True)]
        examples = training_examples(listed, positive_fraction=1.0)
        assert len(examples.sft) == 4 and len(examples.pairs) == 3
        assert examples.skipped == {"negative_without_correction": 1}
        sft = await client.datasets.upload(examples.sft_jsonl(), display_name="feedback-sft")
        pairs = await client.datasets.upload(examples.pairs_jsonl(), display_name="feedback-dpo")
    assert sft.state == dataset_pb2.Dataset.STATE_READY and sft.record_count == 4
    assert sft.validation_report.rejected_records == 0
    assert pairs.record_count == 3 and pairs.validation_report.rejected_records == 0
    assert pairs.kind == dataset_pb2.DATASET_KIND_PREFERENCE
