"""Realistic fine-tuning records in each format, generated reproducibly."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

WORDS = [
    "account",
    "address",
    "agree",
    "allow",
    "answer",
    "apple",
    "area",
    "argue",
    "arrive",
    "article",
    "attention",
    "author",
    "balance",
    "basket",
    "battery",
    "bicycle",
    "border",
    "bottle",
    "branch",
    "breakfast",
    "bridge",
    "budget",
    "building",
    "button",
    "cabinet",
    "calendar",
    "camera",
    "candle",
    "capital",
    "carpet",
    "castle",
    "ceiling",
    "chapter",
    "charge",
    "cheese",
    "chicken",
    "circle",
    "climate",
    "clock",
    "cloud",
    "coffee",
    "collect",
    "colour",
    "comfort",
    "company",
    "concert",
    "contract",
    "corner",
    "cotton",
    "country",
    "courage",
    "cousin",
    "credit",
    "culture",
    "customer",
    "damage",
    "dance",
    "danger",
    "daughter",
    "debate",
    "decade",
    "degree",
    "delivery",
    "dentist",
    "deposit",
    "desert",
    "design",
    "detail",
    "device",
    "dinner",
    "direction",
    "discount",
    "doctor",
    "document",
    "dollar",
    "drawer",
    "driver",
    "eagle",
    "earth",
    "economy",
    "editor",
    "effort",
    "election",
    "energy",
    "engine",
    "evening",
    "example",
    "exercise",
    "expert",
    "factory",
    "family",
    "farmer",
    "feather",
    "festival",
    "figure",
    "finger",
    "flower",
    "forest",
    "fortune",
    "friend",
    "garden",
    "garlic",
    "glass",
    "government",
    "grammar",
    "guitar",
    "habit",
    "hammer",
    "harbour",
    "health",
    "height",
    "history",
    "holiday",
    "hospital",
    "hotel",
    "hunger",
    "island",
    "jacket",
    "journey",
    "judge",
    "kitchen",
    "knowledge",
    "ladder",
    "language",
    "laptop",
    "lawyer",
    "leather",
    "lesson",
    "letter",
    "library",
    "lemon",
    "machine",
    "magazine",
    "manager",
    "market",
    "meadow",
    "medicine",
    "memory",
    "message",
    "method",
    "minute",
    "mirror",
    "moment",
    "monkey",
    "morning",
    "mountain",
    "museum",
    "music",
    "nation",
    "needle",
    "network",
    "newspaper",
    "noise",
    "notebook",
    "number",
    "ocean",
    "office",
    "orange",
    "oven",
    "owner",
    "packet",
    "painter",
    "paper",
    "parent",
    "passenger",
    "pattern",
    "pencil",
    "people",
    "pepper",
    "picture",
    "pillow",
    "planet",
    "plastic",
    "pocket",
    "poetry",
    "police",
    "potato",
    "powder",
    "printer",
    "prison",
    "problem",
    "product",
    "profit",
    "project",
    "promise",
    "public",
    "puzzle",
    "quality",
    "question",
    "rabbit",
    "radio",
    "railway",
    "reason",
    "recipe",
    "record",
    "region",
    "report",
    "result",
    "river",
    "rocket",
    "routine",
    "salary",
    "sample",
    "school",
    "science",
    "season",
    "second",
    "secret",
    "series",
    "shadow",
    "shelter",
    "signal",
    "silver",
    "singer",
    "sister",
    "skill",
    "society",
    "soldier",
    "source",
    "speech",
    "spirit",
    "spring",
    "square",
    "station",
    "stomach",
    "storage",
    "street",
    "student",
    "studio",
    "subject",
    "summer",
    "supply",
    "surface",
    "system",
    "teacher",
    "temple",
    "theatre",
    "theory",
    "ticket",
    "tiger",
    "tomato",
    "tongue",
    "tourist",
    "towel",
    "tower",
    "traffic",
    "train",
    "travel",
    "treasure",
    "tunnel",
    "uncle",
    "union",
    "valley",
    "vehicle",
    "village",
    "violin",
    "visitor",
    "volume",
    "wallet",
    "weather",
    "website",
    "weekend",
    "window",
    "winter",
    "wisdom",
    "witness",
    "wonder",
    "worker",
    "writer",
    "yard",
]


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def conversation(rng: random.Random) -> tuple[str, str]:
    question = "Explain how the " + sentence(rng, rng.randint(12, 20)).lower()
    answer = sentence(rng, rng.randint(25, 45)) + " " + sentence(rng, rng.randint(10, 20))
    return question, answer


def alpaca(rng: random.Random) -> dict[str, Any]:
    question, answer = conversation(rng)
    record: dict[str, Any] = {"instruction": question, "input": "", "output": answer}
    if rng.random() < 0.3:
        record["input"] = sentence(rng, 8)
    if rng.random() < 0.2:
        record["system"] = "You are a concise assistant."
    return record


def sharegpt(rng: random.Random) -> dict[str, Any]:
    question, answer = conversation(rng)
    follow, reply = conversation(rng)
    return {
        "conversations": [
            {"from": "human", "value": question},
            {"from": "gpt", "value": answer},
            {"from": "human", "value": follow},
            {"from": "gpt", "value": reply},
        ]
    }


def openai_chat(rng: random.Random) -> dict[str, Any]:
    question, answer = conversation(rng)
    return {
        "messages": [
            {"role": "system", "content": "You answer questions about everyday objects."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def prompt_completion(rng: random.Random) -> dict[str, Any]:
    question, answer = conversation(rng)
    return {"prompt": question, "completion": answer}


GENERATORS = {
    "alpaca": alpaca,
    "sharegpt": sharegpt,
    "openai_chat": openai_chat,
    "prompt_completion": prompt_completion,
}


def records(kind: str, count: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [GENERATORS[kind](rng) for _ in range(count)]


def jsonl(items: list[Any]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def perturb(text: str, rng: random.Random) -> str:
    """A near duplicate: one word replaced, as an edited copy would be."""
    words = text.split()
    position = rng.randrange(len(words))
    words[position] = rng.choice(WORDS)
    return " ".join(words)


# Common Chinese characters, for text written without spaces between words.
HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过"
    "子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体"
    "制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内"
    "数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提"
    "直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计"
)
PUNCTUATION = "\uff0c\uff0c\uff0c\u3002\u3001"  # fullwidth comma (x3), full stop, enumeration comma


def chinese(rng: random.Random, characters: int) -> str:
    """Text of about `characters` Chinese characters in sentences, without spaces."""
    parts: list[str] = []
    while sum(len(part) for part in parts) < characters:
        parts.append("".join(rng.choice(HANZI) for _ in range(rng.randint(12, 30))))
        parts.append(rng.choice(PUNCTUATION))
    return "".join(parts[:-1]) + "。"


def perturb_character(text: str, rng: random.Random) -> str:
    """A near duplicate of unspaced text: one character replaced."""
    positions = [i for i, char in enumerate(text) if char in HANZI]
    position = rng.choice(positions)
    return text[:position] + rng.choice(HANZI.replace(text[position], "")) + text[position + 1 :]
