"""The task metric of a model outside the serving path (a merged or exported model read by
transformers): greedy answers to chat prompts rendered with the model's own template, graded by
EvaluationService's own exact-match grader."""

from __future__ import annotations

from typing import Any

from tunefleet.core.graders import Item, grader

Prompt = list[dict[str, str]]


def greedy_answers(
    network: Any, tokenizer: Any, prompts: list[Prompt], max_tokens: int
) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    found: list[str] = []
    with torch.no_grad():
        for start in range(0, len(texts), 20):
            batch = tokenizer(
                texts[start : start + 20],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            output = network.generate(
                **batch,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            found += tokenizer.batch_decode(
                output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
    return found


def exact_match(outputs: list[str], references: list[str]) -> float:
    score = grader("exact_match").score
    pairs = zip(outputs, references, strict=True)
    return sum(score(o, Item(str(i), r)) for i, (o, r) in enumerate(pairs)) / len(outputs)
