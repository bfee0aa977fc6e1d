"""An exported GGUF file run in llama.cpp itself (llama-cpp-python, built by `make test`): the
demo's SmolLM2-135M-Instruct exported as F16 reads the same prompt as the same tokens, carries
the model's chat template, and answers greedily with the tokens transformers answers with on the
source weights; exported as Q8_0, llama.cpp's next-token choices on the prompts are transformers'
on the same file (llama.cpp multiplies Q8_0 weights with activations quantised to 8 bits too, so
a 135M model's greedy answers may part: one of three does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import IN_CI
from tunefleet.adapters.gguf_export import export

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Kenji wants 4 bicycle lamps in Berlin. How many lamps does Kenji want?",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        if IN_CI:
            pytest.fail("llama-cpp-python is not installed (make install-llama-cpp)")
        pytest.skip("llama-cpp-python is not installed (make install-llama-cpp)")
    return llama_cpp


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from tunefleet.demo import models

    return models.smollm2(models.cache_dir())


def transformers_greedy(model: Path, prompts: list[str]) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    network = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = network.generate(
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        answer = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in answer:
            answer = answer[: answer.index(tokenizer.eos_token_id)]
        answers.append(answer)
    return answers


def chat_prompts(model: Path) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    return [
        str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        )
        for question in QUESTIONS
    ]


def test_llama_cpp_answers_the_f16_export_as_transformers_does_the_source(
    llama_cpp: Any, smollm2: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    prompts = chat_prompts(smollm2)
    path = tmp_path / "smollm2-f16.gguf"
    export(smollm2, path, "f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0)
    assert llm.metadata["tokenizer.chat_template"] == (smollm2 / "chat_template.jinja").read_text()
    expected = transformers_greedy(smollm2, prompts)
    for prompt, answer in zip(prompts, expected, strict=True):
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert ids == tokenizer(prompt, add_special_tokens=False).input_ids
        found: list[int] = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos() or len(found) == NEW_TOKENS:
                break
            found.append(token)
        assert found == answer, (prompt, tokenizer.decode(found), tokenizer.decode(answer))


def test_llama_cpp_reads_the_q8_0_export_as_transformers_does(
    llama_cpp: Any, smollm2: Path, tmp_path: Path
) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    path = tmp_path / "model.gguf"
    export(smollm2, path, "q8_0")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, logits_all=True)
    same_file = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    )
    agree = total = 0
    for prompt in chat_prompts(smollm2):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        llm.reset()
        llm.eval(ids)
        mine = np.array(llm.scores[: len(ids)]).argmax(-1)
        with torch.no_grad():
            theirs = same_file(torch.tensor([ids])).logits[0].argmax(-1).numpy()
        agree, total = agree + int((mine == theirs).sum()), total + len(ids)
    assert agree / total >= 0.95, (agree, total)
