"""DPO in the trainer: pairs are encoded with their prompt as context only, the loss is DPO's
against the base model (the adapter disabled), and training raises reward accuracy on pairs of
prompts it never saw."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import ANIMALS, COLOURS, MakeSpec, conversation
from tests.trainer.test_trainer import train
from tunefleet.trainer.data import IGNORE
from tunefleet.trainer.preference import PreferenceRecord, encode_pairs, pair_batches
from tunefleet.trainer.spec import SpecError, parse_spec

CHOSEN = "Colour: {}. Done."
REJECTED = "Farbe: {} -- fertig!"


def write_pairs(path: Path, held_out: int = 4, repeats: int = 8) -> Path:
    """Pairs as DatasetService writes a DATASET_KIND_PREFERENCE dataset: the English answer is
    preferred to the German one. The validation pairs ask about animals no train pair names."""
    with path.open("w") as out:
        for index, (animal, colour) in enumerate(zip(ANIMALS, COLOURS, strict=True)):
            validation = index >= len(ANIMALS) - held_out
            prompt = conversation(animal, colour)[:2]
            record = {
                "messages": prompt,
                "chosen": [{"role": "assistant", "content": CHOSEN.format(colour)}],
                "rejected": [{"role": "assistant", "content": REJECTED.format(colour)}],
                "split": "validation" if validation else "train",
            }
            for _ in range(1 if validation else repeats):
                out.write(json.dumps(record) + "\n")
    return path


def logp(model: Any, example: Any) -> float:
    """The log-probability of an example's labelled tokens, one unpadded sequence at a time."""
    import torch

    ids = torch.tensor([example.input_ids])
    labels = torch.tensor(example.labels[1:])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].log_softmax(-1)
    keep = labels != IGNORE
    return float(logits[keep].gather(1, labels[keep, None]).sum())


def reward(model: Any, example: Any, beta: float) -> float:
    """DPO's implicit reward: beta times the log-ratio of the model and its base."""
    policy = logp(model, example)
    with model.disable_adapter():
        return beta * (policy - logp(model, example))


def dpo_spec(make_spec: MakeSpec, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    return make_spec(
        objective="dpo",
        dpo={"beta": 0.1},
        train_data={"uri": str(pairs), "split": "train"},
        **{"hyperparameters": {"learning_rate": 5e-3, "epochs": 3}, **overrides},
    )


def test_a_pair_trains_on_its_answers_only(chat_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    # A two-turn prompt: its own assistant turn is context, not a target.
    prompt = [*conversation("cat", "red"), {"role": "user", "content": "And the dog?"}]
    record = PreferenceRecord(
        prompt,
        [{"role": "assistant", "content": "blue"}],
        [{"role": "assistant", "content": "grey"}],
    )
    (pair,) = encode_pairs(tokenizer, [record], 256).examples
    for example, answer in ((pair.chosen, "blue"), (pair.rejected, "grey")):
        labelled = [
            t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE
        ]
        assert tokenizer.decode(labelled) == f"{answer}<|end|>"
    (batch,) = pair_batches([pair, pair], 2, 0, seed=1, epoch=0)
    assert batch.pairs == 2 and len(batch.input_ids) == 4
    assert batch.input_ids[0] == batch.input_ids[1] == pair.chosen.input_ids
    assert batch.input_ids[2][: len(pair.rejected.input_ids)] == pair.rejected.input_ids


def test_the_dpo_loss_matches_one_computed_by_hand_on_unpadded_sequences(
    chat_model: Path,
) -> None:
    """Padding, row order and label alignment against a plain per-sequence computation through
    PEFT's own model, with -log sigmoid(beta * (log-ratio(chosen) - log-ratio(rejected)))."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunefleet.trainer.preference import dpo_scores

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    base = AutoModelForCausalLM.from_pretrained(chat_model)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    records = [
        PreferenceRecord(
            conversation(animal, colour)[:2],
            [{"role": "assistant", "content": CHOSEN.format(colour)}],
            [{"role": "assistant", "content": "No." if i % 2 else REJECTED.format(colour * 3)}],
        )
        for i, (animal, colour) in enumerate(zip(ANIMALS[:3], COLOURS[:3], strict=True))
    ]
    pairs = encode_pairs(tokenizer, records, 256).examples
    beta = 0.5

    (batch,) = pair_batches(pairs, 3, tokenizer.pad_token_id or 0, seed=3, epoch=0)
    with torch.no_grad():
        scores = dpo_scores(model, batch, beta)
    # The batch's order is the seeded shuffle: match pairs by their chosen rows.
    for row in range(3):
        pair = next(
            p
            for p in pairs
            if p.chosen.input_ids == batch.input_ids[row][: len(p.chosen.input_ids)]
        )
        chosen, rejected = reward(model, pair.chosen, beta), reward(model, pair.rejected, beta)
        expected = float(-F.logsigmoid(torch.tensor(chosen - rejected)))
        assert float(scores.chosen_rewards[row]) == pytest.approx(chosen, abs=1e-4)
        assert float(scores.rejected_rewards[row]) == pytest.approx(rejected, abs=1e-4)
        assert float(scores.losses[row]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_dpo_raises_reward_accuracy_on_held_out_pairs(
    make_spec: MakeSpec, tmp_path: Path, method: str
) -> None:
    result = train(dpo_spec(make_spec, tmp_path, method=method))
    evaluation = result["evaluation"]
    # The base model is its own reference: loss ln 2, every reward 0 (no pair right).
    assert evaluation["base_validation_loss"] == pytest.approx(math.log(2))
    assert evaluation["reward_accuracy"] == 1.0, evaluation
    assert evaluation["reward_margin"] > 1.0, evaluation
    assert evaluation["validation_loss"] < 0.5 * math.log(2), evaluation
    assert evaluation["perplexity"] is None and evaluation["adapter_changes_logits"]
    assert result["examples"] == 64 and result["dropped"] == 0
    progress = [
        json.loads(line)
        for line in (Path(result["output_dir"]).parent / "progress.jsonl").read_text().splitlines()
    ]
    evaluated = [e for e in progress if e.get("reward_accuracy") is not None]
    assert evaluated and evaluated[-1]["reward_accuracy"] == 1.0
    if method == "qlora":
        return
    # The saved adapter, loaded by plain PEFT, ranks every held-out pair the same way.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(make_spec()["base_model"])
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), result["output_dir"]
    ).eval()
    for animal, colour in zip(ANIMALS[-4:], COLOURS[-4:], strict=True):
        record = PreferenceRecord(
            conversation(animal, colour)[:2],
            [{"role": "assistant", "content": CHOSEN.format(colour)}],
            [{"role": "assistant", "content": REJECTED.format(colour)}],
        )
        (pair,) = encode_pairs(tokenizer, [record], 64).examples
        assert reward(model, pair.chosen, 0.1) > reward(model, pair.rejected, 0.1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "full"}, "objective: dpo needs an adapter method"),
        ({"hyperparameters": {"packing": True}}, "dpo batches whole pairs and does not pack"),
        ({"dpo": {"beta": 0}}, "dpo.beta: Input should be greater than 0"),
    ],
)
def test_dpo_specs_that_cannot_work_are_refused(
    make_spec: MakeSpec, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    spec = dpo_spec(make_spec, tmp_path)
    spec.update(change)
    with pytest.raises(SpecError, match=message):
        parse_spec(spec)


def test_sft_data_is_refused_by_a_dpo_job(make_spec: MakeSpec, tmp_path: Path) -> None:
    trainer_spec = parse_spec(make_spec(objective="dpo"))  # the conversations of make_spec
    from tunefleet.trainer.train import Trainer

    trainer = Trainer(trainer_spec)
    with pytest.raises(SpecError, match="line 1 is not a preference pair"):
        trainer.run()
    trainer.reporter.close()
