"""Exact and near-duplicate detection.

Exact duplicates share a key: a hash of the conversation with case folded and whitespace
collapsed. Near duplicates are found with MinHash LSH over 3-gram shingles of tokens: each record
gets a signature of `NUM_PERM` minimum hash values (computed for many records at once with numpy);
signatures are cut into bands, records sharing a band are candidates, and a candidate pair counts
when the signatures estimate its Jaccard similarity at or above the threshold.

A token is a word, except in scripts written without spaces between words (Chinese, Japanese,
Thai, Lao, Khmer, Burmese), where it is one character: their shingles are character 3-grams, so a
one-character edit in a long Chinese answer changes a few shingles, not the only "word" there is.
A long text is read in pieces, so the memory a signature needs is bounded whatever its length.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

NUM_PERM = 128
SHINGLE_WORDS = 3
# Han (with its extensions and compatibility forms), kana, Thai, Lao, Myanmar and Khmer.
_UNSPACED = (
    "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f"
    "\u1780-\u17ff\U00020000-\U0002fa1f"
)
_TOKEN = re.compile(f"[{_UNSPACED}]|[^\\W{_UNSPACED}]+")
_SPACE = re.compile(r"\s+")
_BREAK = re.compile(f"[\\W{_UNSPACED}]")  # where a text can be cut without cutting a token
# Texts longer than this are tokenised and hashed piece by piece.
PIECE_CHARS = 1 << 17
_MAX_MEMO_WORDS = 200_000

_K1, _K2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)  # odd mixing constants

Signature = npt.NDArray[np.uint32]


def exact_key(messages: Sequence[dict[str, object]]) -> bytes:
    """Equal for conversations that differ only in case and whitespace."""
    canonical = "\x1e".join(
        f"{m['role']}\x1f{_SPACE.sub(' ', str(m['content'])).strip().casefold()}" for m in messages
    )
    return hashlib.blake2b(canonical.encode(), digest_size=16).digest()


def pieces(text: str) -> Iterator[str]:
    """`text` in pieces of at most about PIECE_CHARS characters, cut between tokens (after a
    space, punctuation or an unspaced-script character) where one is near the cut."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        window = text[end - 1024 : end]
        cuts = [match.end() for match in _BREAK.finditer(window)]
        end = end - 1024 + cuts[-1] if cuts else end  # a 1024-character token is cut
        yield text[start:end]
        start = end
    yield text[start:]


class _WordCodes(dict[str, int]):
    """crc32 of each word, computed once per distinct word."""

    def __missing__(self, word: str) -> int:
        code = self[word] = zlib.crc32(word.encode())
        return code


class MinHasher:
    """Computes MinHash signatures of texts over their word 3-gram shingles, with `NUM_PERM`
    seeded multiply-shift hash functions h(x) = ((a*x + b) mod 2^64) >> 32, a odd (a universal
    family; numpy's wrapping uint64 arithmetic does the modulo). Texts are processed in batches so
    that the work is a few large numpy operations rather than many small ones."""

    def __init__(self, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
        self._word_codes = _WordCodes()

    def shingles(
        self, texts: Sequence[str]
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
        """The shingle hashes of all texts, concatenated, and how many belong to each text.
        A text of one or two words is one shingle."""
        codes: list[npt.NDArray[np.uint64]] = []
        words = np.zeros(len(texts), dtype=np.int64)
        for index, text in enumerate(texts):
            for piece in self.codes(text):
                codes.append(piece)
                words[index] += len(piece)
        codes_array = np.concatenate(codes) if codes else np.zeros(0, dtype=np.uint64)
        ends = np.cumsum(words)
        pieces: list[npt.NDArray[np.uint64]] = []
        counts = np.zeros(len(texts), dtype=np.int64)
        # Consecutive runs of texts with at least three words are shingled in one vector step;
        # a window is kept only when its three words belong to the same text.
        owner = np.repeat(np.arange(len(texts)), words)
        with np.errstate(over="ignore"):
            windows = codes_array[:-2] * _K1 + codes_array[1:-1] * _K2 + codes_array[2:]
            valid = owner[:-2] == owner[2:] if len(owner) > 2 else np.zeros(0, dtype=bool)
            long_enough = words >= SHINGLE_WORDS
            if long_enough.all():
                return windows[valid], words - 2
            for index in range(len(texts)):
                start, stop = int(ends[index] - words[index]), int(ends[index])
                if words[index] >= SHINGLE_WORDS:
                    pieces.append(windows[start : stop - 2])
                    counts[index] = words[index] - 2
                elif words[index] > 0:
                    mixed = np.bitwise_xor.reduce(codes_array[start:stop] * _K1)
                    pieces.append(np.asarray([mixed], dtype=np.uint64))
                    counts[index] = 1
        if not pieces:
            return np.zeros(0, dtype=np.uint64), counts
        return np.concatenate(pieces), counts

    def codes(self, text: str) -> Iterator[npt.NDArray[np.uint64]]:
        """The codes of a text's tokens, a piece of the text at a time."""
        memo = self._word_codes
        if len(memo) > _MAX_MEMO_WORDS:  # bound the memo on huge vocabularies
            memo.clear()
        for piece in pieces(text):
            found = _TOKEN.findall(piece.casefold())
            yield np.fromiter(map(memo.__getitem__, found), dtype=np.uint64, count=len(found))

    def signatures(self, texts: Sequence[str], max_cells: int = 4_000_000) -> Signature:
        """One row of NUM_PERM values per text; texts without words get all-ones rows, which
        match nothing. Long texts are hashed on their own, a block of shingles at a time."""
        out = np.full((len(texts), NUM_PERM), np.iinfo(np.uint32).max, dtype=np.uint32)
        # A text has at most as many shingles as characters: up to `rows` characters, one text
        # never needs more than the batch's buffer.
        rows = max_cells // NUM_PERM
        long = [index for index, text in enumerate(texts) if len(text) > rows]
        for index in long:
            out[index] = self._long_signature(texts[index], rows)
        if long:
            short = [index for index, text in enumerate(texts) if len(text) <= rows]
            out[short] = self._signatures([texts[index] for index in short], max_cells)
            return out
        return self._signatures(texts, max_cells)

    def _long_signature(self, text: str, block_shingles: int) -> Signature:
        """The signature of one long text, its shingles hashed `block_shingles` at a time (the
        same shingles as `shingles` gives: a window runs across the pieces)."""
        running = np.full(NUM_PERM, np.iinfo(np.uint64).max, dtype=np.uint64)
        carry = np.zeros(0, dtype=np.uint64)  # the last two codes of the previous piece
        total = 0
        for piece in self.codes(text):
            codes = np.concatenate([carry, piece])
            total += len(piece)
            carry = codes[-2:]
            if len(codes) < SHINGLE_WORDS:
                continue
            with np.errstate(over="ignore"):
                windows = codes[:-2] * _K1 + codes[1:-1] * _K2 + codes[2:]
                for start in range(0, len(windows), block_shingles):
                    block = windows[None, start : start + block_shingles] * self.a[:, None]
                    block += self.b[:, None]
                    block >>= np.uint64(32)
                    np.minimum(running, block.min(axis=1), out=running)
        if total < SHINGLE_WORDS:  # a long text of one or two tokens
            short: Signature = self._signatures([text], block_shingles * NUM_PERM)[0]
            return short
        return running.astype(np.uint32)

    def _signatures(self, texts: Sequence[str], max_cells: int) -> Signature:
        values, counts = self.shingles(texts)
        out = np.full((len(texts), NUM_PERM), np.iinfo(np.uint32).max, dtype=np.uint32)
        ends = np.cumsum(counts)
        rows = max(1, max_cells // NUM_PERM)
        # Laid out permutation-major, so each permutation's minimum runs over contiguous memory.
        buffer = np.empty((NUM_PERM, rows), dtype=np.uint64)
        first = 0
        while first < len(texts):
            # Texts [first, last) whose shingles fit in the buffer (at least one text).
            base = int(ends[first] - counts[first])
            last = max(int(np.searchsorted(ends, base + rows, side="right")), first + 1)
            stop = int(ends[last - 1])
            if stop - base > buffer.shape[1]:
                buffer = np.empty((NUM_PERM, stop - base), dtype=np.uint64)
            block = buffer[:, : stop - base]
            np.multiply(self.a[:, None], values[None, base:stop], out=block)
            np.add(block, self.b[:, None], out=block)
            np.right_shift(block, np.uint64(32), out=block)
            present = np.flatnonzero(counts[first:last])
            if len(present):
                offsets = (ends[first:last] - counts[first:last])[present] - base
                out[first + present] = np.minimum.reduceat(block, offsets, axis=1).T
            first = last
        return out


def lsh_bands(threshold: float) -> tuple[int, int]:
    """Bands and rows per band (bands x rows = NUM_PERM) that best separate pairs above
    `threshold` from pairs below it."""
    best, best_error = (16, 8), float("inf")
    grid = np.linspace(0.0, 1.0, 201)
    for rows in (1, 2, 4, 8, 16, 32, 64, 128):
        bands = NUM_PERM // rows
        probability = 1 - (1 - grid**rows) ** bands
        false_positive = probability[grid < threshold].sum()
        false_negative = (1 - probability[grid >= threshold]).sum()
        # Candidates are verified afterwards, so a false candidate costs only time while a
        # missed one costs recall: weigh misses nine times as much.
        error = 0.1 * false_positive + 0.9 * false_negative
        if error < best_error:
            best, best_error = (bands, rows), error
    return best


@dataclass(frozen=True)
class Pair:
    first: int  # the earlier record
    second: int  # the later record
    similarity: float  # estimated Jaccard similarity


ExactSimilarity = Callable[[int, int], float]

# Candidates whose signatures estimate a similarity this far below the threshold still get an
# exact check (the estimate's standard error at 128 permutations is up to 0.044).
ESTIMATE_MARGIN = 0.15


class SignatureFile:
    """Signatures stored row after row in a file (uint32, NUM_PERM per row), read a block of
    rows at a time: LSH over millions of records never holds (or maps) the whole file."""

    BLOCK_ROWS = 65_536

    def __init__(self, path: Path, count: int) -> None:
        self.path, self.count = path, count

    def __len__(self) -> int:
        return self.count

    def columns(self, first: int, stop: int) -> Iterator[Signature]:
        """Columns [first, stop) of every row, a block of rows at a time."""
        with self.path.open("rb") as file:
            for start in range(0, self.count, self.BLOCK_ROWS):
                rows = min(self.BLOCK_ROWS, self.count - start)
                block = np.fromfile(file, dtype=np.uint32, count=rows * NUM_PERM)
                yield block.reshape(rows, NUM_PERM)[:, first:stop].copy()  # not a view of it

    def __getitem__(self, rows: npt.NDArray[np.int64]) -> Signature:
        """The signatures of some rows (a candidate group)."""
        out = np.empty((len(rows), NUM_PERM), dtype=np.uint32)
        with self.path.open("rb") as file:
            for position, row in enumerate(rows.tolist()):
                file.seek(row * NUM_PERM * 4)
                out[position] = np.fromfile(file, dtype=np.uint32, count=NUM_PERM)
        return out


def _blocks(signatures: Signature | SignatureFile, first: int, stop: int) -> Iterator[Signature]:
    if isinstance(signatures, SignatureFile):
        yield from signatures.columns(first, stop)
    else:
        yield signatures[:, first:stop]


def _band_keys(
    signatures: Signature | SignatureFile, first: int, mixers: npt.NDArray[np.uint64]
) -> npt.NDArray[np.uint64]:
    """One 64-bit key per row for the band of columns [first, first + len(mixers))
    (collisions only cost a verification)."""
    keys = []
    with np.errstate(over="ignore"):
        for block in _blocks(signatures, first, first + len(mixers)):
            keys.append((block.astype(np.uint64) * mixers).sum(axis=1, dtype=np.uint64))
    return np.concatenate(keys)


def near_pairs(
    signatures: Signature | SignatureFile,
    threshold: float,
    *,
    cross: tuple[int, int] | None = None,
    exact: ExactSimilarity | None = None,
) -> Iterator[Pair]:
    """Pairs of rows whose similarity is at least `threshold`: the exact Jaccard similarity from
    `exact(i, j)` when given (for candidates whose estimate is near the threshold), else the
    signatures' estimate. With `cross=(n, m)`, rows [0, n) are one set and [n, n+m) another, and
    only pairs across them are reported."""
    count = len(signatures)
    if count < 2:
        return
    bands, rows = lsh_bands(threshold)
    # A text without tokens has an all-ones signature; its first value is enough to know it.
    empty = np.concatenate([b[:, 0] == np.iinfo(np.uint32).max for b in _blocks(signatures, 0, 1)])
    mixers = np.random.default_rng(0).integers(1, 2**63, rows, dtype=np.uint64) | np.uint64(1)
    seen: set[tuple[int, int]] = set()
    for band in range(bands):
        keys = _band_keys(signatures, band * rows, mixers)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        repeated = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if len(repeated) == 0:
            continue
        # Start of each run of equal keys that has at least two members.
        run_starts = repeated[np.concatenate(([True], repeated[1:] != repeated[:-1] + 1))]
        for start in run_starts.tolist():
            stop = start + 1
            while stop < len(sorted_keys) and sorted_keys[stop] == sorted_keys[start]:
                stop += 1
            group = np.sort(order[start:stop])
            if not empty[group[0]]:
                yield from _verify(signatures, group, threshold, seen, cross, exact)


def _verify(
    signatures: Signature | SignatureFile,
    group: npt.NDArray[np.int64],
    threshold: float,
    seen: set[tuple[int, int]],
    cross: tuple[int, int] | None,
    exact: ExactSimilarity | None,
) -> Iterator[Pair]:
    # Compare each member with the ones after it; in a large bucket only with the first few, as
    # clusters are joined transitively anyway.
    limit = len(group) if len(group) <= 64 else 8
    members = signatures[group]
    for i in range(min(limit, len(group) - 1)):
        first = int(group[i])
        others = group[i + 1 :]
        similarities = (members[i + 1 :] == members[i]).mean(axis=1)
        floor = threshold - ESTIMATE_MARGIN if exact else threshold
        for other, similarity in zip(others.tolist(), similarities.tolist(), strict=True):
            if similarity < floor or (first, other) in seen:
                continue
            if cross is not None and (first < cross[0]) == (other < cross[0]):
                continue
            seen.add((first, other))
            if exact is not None:
                similarity = exact(first, other)
            if similarity >= threshold:
                yield Pair(first, other, similarity)


def jaccard(a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]) -> float:
    """Exact Jaccard similarity of two shingle sets."""
    first, second = np.unique(a), np.unique(b)
    union = len(np.union1d(first, second))
    return len(np.intersect1d(first, second, assume_unique=True)) / union if union else 0.0


class UnionFind:
    """Clusters of record indexes."""

    def __init__(self, size: int) -> None:
        self.parent = array("q", range(size))

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            # The smaller index stays the root: clusters are represented by their first record.
            low, high = sorted((root_a, root_b))
            self.parent[high] = low
