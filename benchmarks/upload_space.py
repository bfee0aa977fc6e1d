"""The working space a dataset upload takes, against what its space accounting claims.

    python benchmarks/upload_space.py [--records 20000]

While an upload streams in, its working files (spool, duplicate signatures) grow; when it
finishes, it writes its final records file and the blob store's copy. `storage.
upload_space_factor` is the second amount over the first, claimed before the disk fills (see
tunefleet.storage.spools.SpaceBudget). For each format, and for tiny records (where the
normalised spool outgrows the upload most), this prints the upload's size, its working files at
the end of the stream, the peak (all of them and the blob, just before they are removed) and the
factor that peak needed: the default must cover the largest.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def tiny(rng: random.Random) -> dict[str, Any]:
    return {"instruction": f"q{rng.randrange(10**9)}", "output": "a"}


def measure(name: str, lines: list[dict[str, Any]], directory: Path) -> float:
    from tunefleet.datasets.manager import DatasetManager, UploadHeader
    from tunefleet.datasets.pipeline import IngestOptions
    from tunefleet.runtime.context import open_storage
    from tunefleet.runtime.settings import load_settings

    settings = load_settings(data_dir=directory)
    storage = open_storage(settings)
    manager = DatasetManager(storage.database, storage.blobs, workdir=directory / "work")
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = manager.start_upload(UploadHeader(IngestOptions(validation_fraction=0.1)))
    for start in range(0, len(data), 256 * 1024):
        manager.feed(upload, data[start : start + 256 * 1024])
    streamed = upload.ingestor.written_bytes
    peak = 0
    put_file = storage.blobs.put_file

    def measured_put(path: Path) -> Any:
        nonlocal peak
        blob = put_file(path)
        peak = folder_bytes(upload.ingestor.workdir) + blob.size
        return blob

    storage.blobs.put_file = measured_put  # type: ignore[method-assign]
    manager.complete(upload)
    storage.close()
    factor = (peak - streamed) / streamed
    print(
        f"{name:<22}{len(data) / 2**20:>10.2f}{streamed / 2**20:>12.2f}{peak / 2**20:>10.2f}"
        f"{peak / len(data):>12.2f}{factor:>10.2f}",
        flush=True,
    )
    return factor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.datasets.records import GENERATORS
    from tunefleet.runtime.settings import StorageSettings

    rng = random.Random(0)
    cases = {kind: [make(rng) for _ in range(args.records)] for kind, make in GENERATORS.items()}
    cases["alpaca, tiny records"] = [tiny(rng) for _ in range(args.records)]
    print(
        f"{'records':<22}{'upload MiB':>10}{'streamed MiB':>12}{'peak MiB':>10}"
        f"{'peak/upload':>12}{'factor':>10}"
    )
    needed = []
    for name, lines in cases.items():
        with tempfile.TemporaryDirectory() as directory:
            needed.append(measure(name, lines, Path(directory)))
    default = StorageSettings().upload_space_factor
    print(f"largest factor needed {max(needed):.2f}; storage.upload_space_factor {default:g}")
    if max(needed) > default:
        sys.exit("the default factor does not cover every upload measured")


if __name__ == "__main__":
    main()
