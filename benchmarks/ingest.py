"""Ingestion benchmark: tunefleet's pipeline against the one a user would assemble from
well-kept libraries (HF `datasets` to load, pandas to drop exact duplicates, `datasketch`
MinHashLSH for near duplicates), on the same generated files, in the same run.

    python benchmarks/ingest.py [--records 200000] [--rounds 3]

The files mix the four formats (one file per format), with 10% exact duplicates (case and
whitespace changed), 5% near duplicates (one word of the answer replaced) and 2% records with
PII. Each pipeline runs in its own process, so peak memory is that process's maximum RSS; after
a warm-up run of each, the two alternate over `--rounds` rounds (benchmarks/harness.py: who goes
first rotates), every round printed, and each ratio is printed as its median and range. Both use
3-gram shingles, 128 permutations and a Jaccard threshold of 0.8 (tunefleet's tokens are words,
and characters in unspaced scripts; the baseline's are words).
tunefleet also validates every record, detects and redacts PII, splits and writes the dataset;
the baseline does none of that.

Then two slices where data is not English prose:
- Chinese: long answers, each beside a copy with one character replaced (and, for reference,
  English answers beside a copy with one word replaced): near-duplicate recall of both pipelines;
- code and math (tests/datasets/corpora/code_and_math.txt: slices, `::`, long decimals,
  versions, hashes, timestamps): the share of records tunefleet's PII detection flags (every
  one a false positive), and its recall on personal data planted in such records, by type.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import rotations, spread, warm_up  # noqa: E402

FORMATS = ("alpaca", "sharegpt", "openai_chat", "prompt_completion")
THRESHOLD, NUM_PERM = 0.8, 128
_WORD = re.compile(r"\w+")


# --- data ------------------------------------------------------------------------------------


def generate(total: int, directory: Path, seed: int = 0) -> dict[str, Any]:
    """Write one JSONL file per format; returns the planted duplicates by file and line."""
    sys.path.insert(0, str(ROOT))
    from tests.datasets.records import GENERATORS, perturb

    rng = random.Random(seed)
    truth: dict[str, Any] = {}
    per_file = total // len(FORMATS)
    for kind in FORMATS:
        exact_count, near_count = per_file // 10, per_file // 20
        originals = [GENERATORS[kind](rng) for _ in range(per_file - exact_count - near_count)]
        for record in rng.sample(originals, len(originals) // 50):
            _add_pii(record, rng)
        # Random order, each copy somewhere after its original: sort on a random key, and give
        # a copy a key between its original's and 1.
        keys = [rng.random() for _ in originals]
        rows: list[tuple[float, Any, str, int]] = [
            (keys[i], r, "original", i) for i, r in enumerate(originals)
        ]
        for kind_of_copy, count in (("exact", exact_count), ("near", near_count)):
            for source in rng.sample(range(len(originals)), count):
                copy = json.loads(json.dumps(originals[source]))
                _edit(copy, kind_of_copy, rng, perturb)
                key = keys[source] + (1 - keys[source]) * rng.random()
                rows.append((key, copy, kind_of_copy, source))
        rows.sort(key=lambda row: row[0])
        ordered = [(record, role, source) for _, record, role, source in rows]
        lines = {index: line for line, (_, role, index) in enumerate(ordered) if role == "original"}
        path = directory / f"{kind}.jsonl"
        with path.open("w") as out:
            for record, _, _ in ordered:
                out.write(json.dumps(record) + "\n")
        truth[kind] = {
            "path": str(path),
            "records": len(ordered),
            "pairs": [
                {"original": lines[source] + 1, "copy": line + 1, "kind": role}
                for line, (_, role, source) in enumerate(ordered)
                if role != "original"
            ],
        }
    return truth


def _add_pii(record: dict[str, Any], rng: random.Random) -> None:
    extra = rng.choice(
        [" Write to sam.lee@example.org.", " Call +1 415 555 0134.", " Card 4111 1111 1111 1111."]
    )
    _set_answer(record, _answer(record) + extra)


def _edit(record: dict[str, Any], kind: str, rng: random.Random, perturb: Any) -> None:
    answer = _answer(record)
    if kind == "exact":
        _set_answer(record, "  " + answer.upper().replace(" ", "  ") + " ")
    else:
        _set_answer(record, perturb(answer, rng))


def _answer(record: dict[str, Any]) -> str:
    if "output" in record:
        return str(record["output"])
    if "completion" in record:
        return str(record["completion"])
    turns = record.get("messages") or record["conversations"]
    key = "content" if "messages" in record else "value"
    return str(turns[-1][key])


def _set_answer(record: dict[str, Any], text: str) -> None:
    if "output" in record:
        record["output"] = text
    elif "completion" in record:
        record["completion"] = text
    else:
        turns = record.get("messages") or record["conversations"]
        turns[-1]["content" if "messages" in record else "value"] = text


# --- the two pipelines (each run in a child process) -----------------------------------------


def run_tunefleet(truth: dict[str, Any], workdir: Path) -> dict[str, list[int]]:
    from tunefleet.datasets.pipeline import IngestOptions, Ingestor

    removed: dict[str, list[int]] = {}
    for kind, info in truth.items():
        ingestor = Ingestor(IngestOptions(), workdir / kind)
        with Path(info["path"]).open("rb") as file:
            while chunk := file.read(1 << 20):
                ingestor.feed(chunk)
        result = ingestor.finish()
        kept = {json.loads(line)["source_line"] for line in result.records_path.open("rb")}
        removed[kind] = sorted(set(range(1, info["records"] + 1)) - kept)
        ingestor.close()
    return removed


def run_baseline(truth: dict[str, Any], workdir: Path) -> dict[str, list[int]]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ["HF_DATASETS_CACHE"] = str(workdir / "hf-cache")
    import datasets
    from datasketch import MinHash, MinHashLSH

    datasets.disable_progress_bars()
    removed: dict[str, list[int]] = {}
    for kind, info in truth.items():
        table = datasets.load_dataset("json", data_files=info["path"], split="train")
        table = table.map(lambda row: {"text": _row_text(row)}, remove_columns=table.column_names)
        frame = table.to_pandas()
        frame["line"] = range(1, len(frame) + 1)
        frame["norm"] = frame["text"].str.lower().str.split().str.join(" ")
        unique = frame.drop_duplicates("norm")
        exact_removed = set(frame["line"]) - set(unique["line"])
        lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
        near_removed: set[int] = set()
        for line, text in zip(unique["line"], unique["text"], strict=True):
            words = _WORD.findall(text.lower())
            shingles = {" ".join(words[i : i + 3]) for i in range(max(1, len(words) - 2))}
            signature = MinHash(num_perm=NUM_PERM)
            signature.update_batch([s.encode() for s in shingles])
            if lsh.query(signature):
                near_removed.add(int(line))
            else:
                lsh.insert(str(line), signature)
        removed[kind] = sorted(exact_removed | near_removed)
    return removed


def _row_text(row: dict[str, Any]) -> str:
    if row.get("messages"):
        return "\n".join(m["content"] for m in row["messages"])
    if row.get("conversations"):
        return "\n".join(t["value"] for t in row["conversations"])
    if row.get("instruction") is not None:
        return "\n".join(
            str(row.get(k) or "") for k in ("system", "instruction", "input", "output")
        )
    return f"{row['prompt']}\n{row['completion']}"


def child(name: str, truth_path: Path, out_path: Path) -> None:
    truth = json.loads(truth_path.read_text())
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        run = run_tunefleet if name == "tunefleet" else run_baseline
        removed = run(truth, Path(workdir))
        seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out_path.write_text(
        json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024, "removed": removed})
    )


# --- scoring ----------------------------------------------------------------------------------


def score(truth: dict[str, Any], removed: dict[str, list[int]]) -> dict[str, float]:
    found = {"exact": 0, "near": 0}
    planted = {"exact": 0, "near": 0}
    false_positives = removed_total = 0
    for kind, info in truth.items():
        gone = set(removed[kind])
        in_pairs: set[int] = set()
        for pair in info["pairs"]:
            planted[pair["kind"]] += 1
            in_pairs.update((pair["original"], pair["copy"]))
            if pair["copy"] in gone or pair["original"] in gone:
                found[pair["kind"]] += 1
        removed_total += len(gone)
        false_positives += len(gone - in_pairs)
    return {
        "exact_recall": found["exact"] / max(1, planted["exact"]),
        "near_recall": found["near"] / max(1, planted["near"]),
        "precision": 1 - false_positives / removed_total if removed_total else 1.0,
    }


def run_child(name: str, truth_path: Path, directory: Path) -> dict[str, Any]:
    out = directory / f"{name}.json"
    command = [sys.executable, __file__, "--child", name, "--truth", str(truth_path)]
    subprocess.run([*command, "--out", str(out)], check=True)
    return dict(json.loads(out.read_text()))


# --- slices -----------------------------------------------------------------------------------


def chinese_slice(directory: Path, count: int = 1000) -> None:
    """Near-duplicate recall on Chinese (one character edited) and English (one word edited)."""
    sys.path.insert(0, str(ROOT))
    from tests.datasets.records import chinese, perturb, perturb_character, sentence

    rng = random.Random(3)
    truth: dict[str, Any] = {}

    def han() -> str:
        return str(chinese(rng, 300))

    def english() -> str:
        return " ".join(sentence(rng, 20) for _ in range(6))

    for language, answer, edit in (
        ("chinese", han, perturb_character),
        ("english", english, perturb),
    ):
        path = directory / f"{language}.jsonl"
        with path.open("w") as out:
            for index in range(count):
                text = answer()
                for completion in (text, edit(text, rng)):
                    record = {"prompt": f"question {index}", "completion": completion}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
        pairs = [{"original": 2 * i + 1, "copy": 2 * i + 2, "kind": "near"} for i in range(count)]
        truth[language] = {"path": str(path), "records": 2 * count, "pairs": pairs}
    truth_path = directory / "languages.json"
    truth_path.write_text(json.dumps(truth))
    print(f"near-duplicate recall, {count} answers each beside a copy with one edit:")
    for name in ("tunefleet", "baseline"):
        removed = run_child(name, truth_path, directory)["removed"]
        recalls = {
            language: score({language: info}, {language: removed[language]})["near_recall"]
            for language, info in truth.items()
        }
        print(f"  {name:<10} chinese {recalls['chinese']:.3f}   english {recalls['english']:.3f}")


def code_slice(count: int = 2000) -> None:
    """PII false positives on code and math, and recall on PII planted in it."""
    sys.path.insert(0, str(ROOT))
    from tests.datasets.test_pii import CODE_AND_MATH, PLANTED
    from tunefleet.datasets.pii import find
    from tunefleet.v1.dataset_pb2 import PiiType

    rng = random.Random(4)
    lines = [line for line in CODE_AND_MATH.read_text().splitlines() if line.strip()]
    texts = ["\n".join(rng.sample(lines, 6)) for _ in range(count)]
    flagged = sum(1 for text in texts if find(text))
    planted = [(kind, rng.choice(texts) + "\n" + text) for kind, text in PLANTED * 10]
    found = sum(
        1
        for kind, text in planted
        if [PiiType.Name(f.type) for f in find(text)] == [f"PII_TYPE_{kind}"]
    )
    print(
        f"code and math, {count} records of 6 corpus lines: flagged as PII {flagged / count:.4f}; "
        f"planted PII found with its type {found}/{len(planted)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["tunefleet", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--truth", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.truth, args.out)
        return
    labels = {"tunefleet": "tunefleet", "baseline": "datasets+pandas+datasketch"}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        truth = generate(args.records, directory)
        truth_path = directory / "truth.json"
        truth_path.write_text(json.dumps(truth))
        total = sum(info["records"] for info in truth.values())
        size = sum(Path(info["path"]).stat().st_size for info in truth.values())
        print(f"{total} records in {len(truth)} files ({size / 2**20:.1f} MiB)", flush=True)
        print(
            f"{'round':<7}{'pipeline':<28}{'records/s':>12}{'peak MiB':>10}{'exact rec.':>12}"
            f"{'near rec.':>11}{'precision':>11}"
        )

        def run(name: str, label: int | str) -> dict[str, Any]:
            result = run_child(name, truth_path, directory)
            result.update(score(truth, result.pop("removed")))
            print(
                f"{label!s:<7}{labels[name]:<28}{total / result['seconds']:>12,.0f}"
                f"{result['peak_mib']:>10,.0f}{result['exact_recall']:>12.3f}"
                f"{result['near_recall']:>11.3f}{result['precision']:>11.4f}",
                flush=True,
            )
            return result

        warm_up(list(labels), lambda name: run(name, "warm"))
        speed, memory = [], []
        for round_number, order in rotations(list(labels), args.rounds):
            results = {name: run(name, round_number) for name in order}
            ours, theirs = results["tunefleet"], results["baseline"]
            speed.append(theirs["seconds"] / ours["seconds"])
            memory.append(ours["peak_mib"] / theirs["peak_mib"])
        print(f"speed ratio (tunefleet / baseline) over {args.rounds} rounds: {spread(speed)}")
        print(f"peak memory ratio (tunefleet / baseline): {spread(memory, unit='')}")
        chinese_slice(directory)
    code_slice()


if __name__ == "__main__":
    main()
