"""Evaluation suites that ship with tunefleet: items written for the project (no benchmark data
can be downloaded where it runs), under the project's licence (Apache-2.0).

`general()` is the general-skills regression suite: 300 short questions with one right answer, in
four groups (each record's `cluster` names its task):

- knowledge (100): capitals, chemical symbols, everyday facts;
- reasoning (110): arithmetic, word problems, comparisons;
- instruction following (65): upper case, spelling backwards, counting words;
- format (25): ordered lists, yes/no, a JSON object.

Every question says how to answer (one word, the number only, ...), so exact match after SQuAD's
normalisation (`exact_match` with `normalise`) grades a model that obeys; small models answer in
sentences, and `string_check` `like` with `normalise` (the answer's words within the reply)
grades what they know rather than their form. `write_lm_eval_task` writes it as a
local lm-evaluation-harness task (`tunefleet_general`), graded the same way by lm-eval's own
exact match. It is meant for comparisons, an adapter
against the base model on the same items (did fine-tuning cost general skills?), not as an
absolute measure of a model. Built from fixed lists and formulas: the same 300 records every
time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"),
    ("Australia", "Canberra"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Russia", "Moscow"), ("Ukraine", "Kyiv"),
    ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
    ("South Korea", "Seoul"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Cuba", "Havana"),
    ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("New Zealand", "Wellington"), ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Venezuela", "Caracas"), ("Romania", "Bucharest"),
]  # fmt: skip
ELEMENTS = [
    ("hydrogen", "H"), ("helium", "He"), ("lithium", "Li"), ("carbon", "C"), ("nitrogen", "N"),
    ("oxygen", "O"), ("fluorine", "F"), ("neon", "Ne"), ("sodium", "Na"), ("magnesium", "Mg"),
    ("aluminium", "Al"), ("silicon", "Si"), ("phosphorus", "P"), ("sulfur", "S"),
    ("chlorine", "Cl"), ("argon", "Ar"), ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"),
    ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"), ("tin", "Sn"), ("gold", "Au"),
    ("mercury", "Hg"), ("lead", "Pb"), ("uranium", "U"), ("nickel", "Ni"), ("iodine", "I"),
    ("platinum", "Pt"),
]  # fmt: skip
FACTS = [
    ("Which planet is closest to the Sun? Answer with one word.", "Mercury"),
    ("Which is the largest planet of the solar system? Answer with one word.", "Jupiter"),
    ("Which planet is known as the red planet? Answer with one word.", "Mars"),
    ("How many days are there in a leap year? Answer with the number only.", "366"),
    ("How many days are there in a week? Answer with the number only.", "7"),
    ("How many months are there in a year? Answer with the number only.", "12"),
    ("How many hours are there in a day? Answer with the number only.", "24"),
    ("How many minutes are there in an hour? Answer with the number only.", "60"),
    ("How many legs does a spider have? Answer with the number only.", "8"),
    ("How many legs does an insect have? Answer with the number only.", "6"),
    ("At how many degrees Celsius does pure water freeze at sea level? Answer with the number "
     "only.", "0"),
    ("At how many degrees Celsius does pure water boil at sea level? Answer with the number "
     "only.", "100"),
    ("Which is the largest ocean on Earth? Answer with one word.", "Pacific"),
    ("What is the opposite of hot? Answer with one word.", "cold"),
    ("What colour do you get by mixing blue and yellow paint? Answer with one word.", "green"),
    ("How many sides does a triangle have? Answer with the number only.", "3"),
    ("How many sides does a hexagon have? Answer with the number only.", "6"),
    ("How many centimetres are there in a metre? Answer with the number only.", "100"),
    ("How many grams are there in a kilogram? Answer with the number only.", "1000"),
    ("Which star is at the centre of our solar system? Answer with one word.", "Sun"),
]  # fmt: skip
NAMES = ["Mia", "Omar", "Lena", "Kenji", "Ana", "Tom", "Priya", "Lucas", "Sara", "Yusuf"]
THINGS = ["apples", "books", "stamps", "marbles", "pencils", "shells", "cards", "coins"]
WORDS = [
    "garden", "window", "planet", "silver", "candle", "forest", "rocket", "bridge", "pepper",
    "lemon", "tiger", "cloud", "river", "stone", "music", "paper", "horse", "train", "water",
    "yellow", "market", "button", "island", "winter", "orange",
]  # fmt: skip
SENTENCE_WORDS = ["the", "small", "dog", "runs", "fast", "under", "blue", "sky", "every", "day"]


def _chat(question: str, answer: str, cluster: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        "cluster": cluster,
    }


def _knowledge() -> list[dict[str, Any]]:
    records = [
        _chat(f"What is the capital of {country}? Answer with the city's name only.", city,
              "knowledge/capitals")
        for country, city in CAPITALS
    ]  # fmt: skip
    records += [
        _chat(f"What is the chemical symbol of {element}? Answer with the symbol only.", symbol,
              "knowledge/elements")
        for element, symbol in ELEMENTS
    ]  # fmt: skip
    records += [_chat(question, answer, "knowledge/facts") for question, answer in FACTS]
    return records


def _reasoning() -> list[dict[str, Any]]:
    records = []
    for i in range(60):
        a, b = 12 + (i * 37) % 80, 7 + (i * 53) % 60
        if i % 3 == 0:
            question, answer = f"What is {a} + {b}?", a + b
        elif i % 3 == 1:
            question, answer = f"What is {max(a, b)} - {min(a, b)}?", max(a, b) - min(a, b)
        else:
            a, b = 2 + i // 3, 3 + (i * 7) % 8
            question, answer = f"What is {a} times {b}?", a * b
        records.append(
            _chat(f"{question} Answer with the number only.", str(answer), "reasoning/arithmetic")
        )
    for i in range(30):
        name, thing = NAMES[i % len(NAMES)], THINGS[i % len(THINGS)]
        a, b = 3 + (i * 7) % 20, 2 + (i * 5) % 9
        if i % 3 == 0:
            question = (
                f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
            )
            answer = a + b
        elif i % 3 == 1:
            question = f"{name} has {a + b} {thing} and gives away {b}. How many {thing} are left?"
            answer = a
        else:
            question = f"{name} buys {b} boxes with {a} {thing} in each. How many {thing} is that?"
            answer = a * b
        records.append(
            _chat(f"{question} Answer with the number only.", str(answer), "reasoning/word")
        )
    for i in range(20):
        a, b = 10 + (i * 29) % 90, 10 + (i * 61 + 7) % 90
        if a == b:
            b += 1
        records.append(
            _chat(f"Which number is larger, {a} or {b}? Answer with the number only.",
                  str(max(a, b)), "reasoning/comparison")
        )  # fmt: skip
    return records


def _instructions() -> list[dict[str, Any]]:
    records = [
        _chat(f"Write the word '{word}' in capital letters, and nothing else.", word.upper(),
              "instructions/uppercase")
        for word in WORDS
    ]  # fmt: skip
    records += [
        _chat(f"Spell the word '{word}' backwards, and write nothing else.", word[::-1],
              "instructions/backwards")
        for word in WORDS[:20]
    ]  # fmt: skip
    for i in range(20):
        count = 3 + i % 8
        start = i % len(SENTENCE_WORDS)
        sentence = " ".join(SENTENCE_WORDS[(start + k) % len(SENTENCE_WORDS)] for k in range(count))
        records.append(
            _chat(f"How many words are there in this text: '{sentence}'? Answer with the "
                  "number only.", str(count), "instructions/counting")
        )  # fmt: skip
    return records


def _format() -> list[dict[str, Any]]:
    records = []
    for i in range(10):
        words = [WORDS[(i * 3 + k * 7) % len(WORDS)] for k in range(3)]
        records.append(
            _chat(f"Write the words {words[0]}, {words[1]} and {words[2]} in alphabetical "
                  "order, separated by commas, and nothing else.", ", ".join(sorted(words)),
                  "format/list")
        )  # fmt: skip
    for i in range(10):
        number = 11 + i * 7
        even = "yes" if number % 2 == 0 else "no"
        records.append(
            _chat(f"Is {number} an even number? Answer with yes or no only.", even,
                  "format/yes-no")
        )  # fmt: skip
    for country, city in CAPITALS[:5]:
        records.append(
            _chat(f'Reply with only a JSON object with one key, "capital", whose value is the '
                  f"capital of {country}.", json.dumps({"capital": city}), "format/json")
        )  # fmt: skip
    return records


def general() -> list[dict[str, Any]]:
    """The general-skills suite: 300 records in OpenAI's chat format, each with its `cluster`
    (the task it belongs to)."""
    return [*_knowledge(), *_reasoning(), *_instructions(), *_format()]


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


LM_EVAL_TASK = """\
# The tunefleet general-skills suite as a local lm-evaluation-harness task (Apache-2.0),
# written by `tunefleet eval suite general --lm-eval DIR`:
#   lm_eval --model hf --model_args pretrained=MODEL --include_path DIR \\
#     --tasks tunefleet_general --apply_chat_template
task: tunefleet_general
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{messages[0].content}}}}"
doc_to_target: "{{{{messages[1].content}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  do_sample: false
  max_gen_toks: 32
metric_list:
  # SQuAD's normalisation, as EvaluationService's exact_match with normalise: articles and
  # whitespace, then case and punctuation.
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ['(?i)\\b(a|an|the)\\b', '\\s+']
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""


def write_lm_eval_task(directory: Path) -> Path:
    """The general suite as a local lm-evaluation-harness task in `directory`: its records
    (`general.jsonl`) and `tunefleet_general.yaml`; returns the YAML's path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "general.jsonl"
    data.write_bytes(jsonl(general()))
    task = directory / "tunefleet_general.yaml"
    task.write_text(LM_EVAL_TASK.format(data=json.dumps(str(data.resolve()))))
    return task
