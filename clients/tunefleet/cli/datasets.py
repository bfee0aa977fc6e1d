"""`tunefleet datasets ...`"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from tunefleet.cli.output import (
    calls,
    client,
    console,
    deleted,
    enum_name,
    fields,
    handles_errors,
    listing,
    output_option,
    print_json,
    print_json_line,
    size,
    table,
    when,
)
from tunefleet.v1 import dataset_pb2

FORMATS = {
    name.removeprefix("DATASET_FORMAT_").lower(): value
    for name, value in dataset_pb2.DatasetFormat.items()
    if value != dataset_pb2.DATASET_FORMAT_UNSPECIFIED
}
KINDS = {
    name.removeprefix("DATASET_KIND_").lower(): value
    for name, value in dataset_pb2.DatasetKind.items()
    if value != dataset_pb2.DATASET_KIND_UNSPECIFIED
}
SPLITS = {
    "all": dataset_pb2.DATASET_SPLIT_UNSPECIFIED,
    "train": dataset_pb2.DATASET_SPLIT_TRAIN,
    "validation": dataset_pb2.DATASET_SPLIT_VALIDATION,
}


def key_values(
    context: click.Context, parameter: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, equals, text = value.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}")
        pairs[key] = text
    return pairs


@click.group()
def datasets() -> None:
    """Upload, inspect and delete fine-tuning datasets."""


def report(dataset: dataset_pb2.Dataset) -> None:
    """The validation and cleaning report of an upload."""
    validation, cleaning, tokens = (
        dataset.validation_report,
        dataset.cleaning_report,
        dataset.token_statistics,
    )
    fields(
        [
            ("name", dataset.name),
            (
                "format",
                enum_name(dataset_pb2.DatasetFormat, dataset.source_format, "DATASET_FORMAT_"),
            ),
            ("kind", enum_name(dataset_pb2.DatasetKind, dataset.kind, "DATASET_KIND_")),
            (
                "records",
                f"{dataset.record_count} ({dataset.train_record_count} train, "
                f"{dataset.validation_record_count} validation)",
            ),
            ("read", f"{validation.total_records}, rejected {validation.rejected_records}"),
            (
                "duplicates removed",
                f"{cleaning.exact_duplicates_removed} exact, "
                f"{cleaning.near_duplicates_removed} near",
            ),
            (
                "PII",
                ", ".join(
                    f"{c.count} x {enum_name(dataset_pb2.PiiType, c.type, 'PII_TYPE_')}"
                    for c in cleaning.pii_counts
                )
                or "none found",
            ),
            (
                "tokens",
                f"{tokens.total_tokens} ({tokens.tokenizer_model}), "
                f"{tokens.tokens_per_record.mean:.0f} per record, "
                f"{tokens.records_over_max_length} over {tokens.max_sequence_length}"
                if tokens.tokenizer_model
                else "not measured (no tokenizer model given)",
            ),
            ("tool calls", f"in {validation.tool_call_records} records"),
            (
                "ignored keys",
                ", ".join(f"{k.key} ({k.count} records)" for k in validation.ignored_keys)
                or "none",
            ),
        ]
    )
    if validation.counts:
        table(
            ["PROBLEM", "RECORDS"],
            [
                (enum_name(dataset_pb2.RecordErrorCode, c.code, "RECORD_ERROR_CODE_"), c.count)
                for c in validation.counts
            ],
        )
    if validation.errors:
        table(
            ["LINE", "PROBLEM", "FIELD", "MESSAGE"],
            [
                (
                    e.line,
                    enum_name(dataset_pb2.RecordErrorCode, e.code, "RECORD_ERROR_CODE_"),
                    e.field or "-",
                    e.message,
                )
                for e in validation.errors
            ],
        )


@datasets.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", "display_name", default="", help="Display name (default: the file name).")
@click.option("--description", default="")
@click.option(
    "--label", "labels", multiple=True, metavar="KEY=VALUE", callback=key_values, help="Repeatable."
)
@click.option(
    "--format",
    "record_format",
    type=click.Choice(list(FORMATS)),
    help="Format of the records (default: detected).",
)
@click.option(
    "--kind",
    type=click.Choice(list(KINDS)),
    help="What the dataset must be (default: what the file holds); sft converts preference data.",
)
@click.option("--validation-fraction", type=float, help="Share of records held out (0-0.5).")
@click.option("--seed", type=int, help="Seed of the train/validation split.")
@click.option(
    "--validation-dataset",
    default="",
    help="An existing dataset used whole as the validation side instead of splitting this upload.",
)
@click.option(
    "--invalid-records",
    type=click.Choice(["drop", "reject"]),
    help="Drop invalid records (the default) or reject the whole upload if any is invalid.",
)
@click.option("--min-records", type=int, help="Fewer valid records reject the upload.")
@click.option("--max-record-chars", type=int, help="Longest accepted record, in characters.")
@click.option(
    "--near-duplicate-threshold",
    type=float,
    help="Jaccard similarity at which records are near duplicates, in (0, 1] (default 0.8).",
)
@click.option("--tokenizer-model", default="", help="Model whose tokenizer measures the tokens.")
@click.option("--max-sequence-length", type=int, help="Count records longer than this.")
@click.option("--pii", type=click.Choice(["report", "redact", "drop"]), help="PII policy.")
@click.option("--keep-duplicates", is_flag=True, help="Do not remove duplicate records.")
@click.option("--validate-only", is_flag=True, help="Report without storing the dataset.")
@output_option
@handles_errors
@calls("DatasetService.UploadDataset")
def upload(
    path: Path,
    display_name: str,
    description: str,
    labels: dict[str, str],
    record_format: str | None,
    kind: str | None,
    validation_fraction: float | None,
    seed: int | None,
    validation_dataset: str,
    invalid_records: str | None,
    min_records: int | None,
    max_record_chars: int | None,
    near_duplicate_threshold: float | None,
    tokenizer_model: str,
    max_sequence_length: int | None,
    pii: str | None,
    keep_duplicates: bool,
    validate_only: bool,
    output: str,
) -> None:
    """Upload a dataset file (Alpaca, ShareGPT, OpenAI chat or prompt/completion JSON lines)."""
    options: dict[str, Any] = {"tokenizerModel": tokenizer_model}
    if record_format:
        options["format"] = dataset_pb2.DatasetFormat.Name(FORMATS[record_format])
    if kind:
        options["kind"] = dataset_pb2.DatasetKind.Name(KINDS[kind])
    if validation_fraction is not None:
        options["validationFraction"] = validation_fraction
    if seed is not None:
        options["splitSeed"] = seed
    if validation_dataset:
        options["validationDataset"] = validation_dataset
    if invalid_records:
        options["invalidRecordPolicy"] = f"INVALID_RECORD_POLICY_{invalid_records.upper()}"
    if min_records is not None:
        options["minRecordCount"] = min_records
    if max_record_chars is not None:
        options["maxRecordChars"] = max_record_chars
    if near_duplicate_threshold is not None:
        options["nearDuplicateThreshold"] = near_duplicate_threshold
    if max_sequence_length is not None:
        options["maxSequenceLength"] = max_sequence_length
    if pii:
        options["piiPolicy"] = f"PII_POLICY_{pii.upper()}"
    if keep_duplicates:
        options["removeExactDuplicates"] = options["removeNearDuplicates"] = False
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
        disable=output == "json",
    )
    with progress, client() as tunefleet:
        task = progress.add_task(f"uploading {path.name}", total=path.stat().st_size)
        dataset = tunefleet.datasets.upload(
            path,
            display_name=display_name,
            description=description,
            labels=labels,
            options=options,
            validate_only=validate_only,
            on_progress=lambda sent, _: progress.update(task, completed=sent),
        )
    if output == "json":
        print_json(dataset)
        return
    console.print(f"uploaded {path.name} ({size(path.stat().st_size)})")
    report(dataset)


@datasets.command("from-feedback")
@click.option(
    "--filter",
    "filter_text",
    default="",
    help="Which feedback, such as 'adapter_version=\"adapters/orders/*\"' (default: all).",
)
@click.option(
    "--positive-fraction",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Share of positively rated answers kept as SFT examples (seeded: the same each run).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of that sample.")
@click.option("--name", default="feedback", show_default=True, help="Datasets' display name.")
@click.option(
    "--write",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write sft.jsonl and pairs.jsonl in this folder instead of uploading them.",
)
@output_option
@handles_errors
@calls("InferenceService.ListFeedback", "DatasetService.UploadDataset")
def from_feedback(
    filter_text: str,
    positive_fraction: float,
    seed: int,
    name: str,
    directory: Path | None,
    output: str,
) -> None:
    """Make training data of production feedback: corrected answers as SFT examples, and
    preference pairs (a correction over the model's answer, A/B ratings of one input); uploaded
    as datasets (`NAME-sft`, `NAME-pairs`) unless --write."""
    from tunefleet.client.feedback import training_examples

    with client() as tunefleet:
        feedback = tunefleet.inference.list_feedback(filter_text, include_responses=True)
        examples = training_examples(feedback, positive_fraction=positive_fraction, seed=seed)
        made: dict[str, str] = {}
        for kind, records, data in (
            ("sft", examples.sft, examples.sft_jsonl()),
            ("pairs", examples.pairs, examples.pairs_jsonl()),
        ):
            if not records:
                continue
            if directory is not None:
                directory.mkdir(parents=True, exist_ok=True)
                (directory / f"{kind}.jsonl").write_bytes(data)
                made[kind] = str(directory / f"{kind}.jsonl")
            else:
                made[kind] = tunefleet.datasets.upload(data, display_name=f"{name}-{kind}").name
    summary = {
        "sft_examples": len(examples.sft),
        "preference_pairs": len(examples.pairs),
        "feedback_used": len(examples.sources),
        "skipped": dict(examples.skipped),
        "made": made,
    }
    if output == "json":
        click.echo(json.dumps(summary))
        return
    skipped = ", ".join(f"{count} {why}" for why, count in sorted(examples.skipped.items()))
    console.print(
        f"{len(examples.sft)} SFT examples and {len(examples.pairs)} preference pairs from "
        f"{len(examples.sources)} feedback" + (f" (skipped: {skipped})" if skipped else ""),
        markup=False,
    )
    for kind, where in made.items():
        console.print(f"  {kind}: {where}", markup=False)


@datasets.command("list")
@click.option("--filter", "filter_text", default="", help="Such as state=READY or labels.team=x.")
@output_option
@handles_errors
@calls("DatasetService.ListDatasets")
def list_datasets(filter_text: str, output: str) -> None:
    """List datasets, newest first."""
    with client() as tunefleet:
        items = list(tunefleet.datasets.list(filter=filter_text))
    listing(
        items,
        output,
        ["NAME", "DISPLAY NAME", "RECORDS", "TRAIN", "VALIDATION", "TOKENS", "CREATED"],
        lambda d: (
            d.name,
            d.display_name,
            d.record_count,
            d.train_record_count,
            d.validation_record_count,
            d.token_statistics.total_tokens,
            when(d.create_time),
        ),
    )


@datasets.command()
@click.argument("name")
@output_option
@handles_errors
@calls("DatasetService.GetDataset")
def get(name: str, output: str) -> None:
    """Show a dataset with its validation and cleaning report."""
    with client() as tunefleet:
        dataset = tunefleet.datasets.get(name)
    if output == "json":
        print_json(dataset)
        return
    report(dataset)


@datasets.command()
@click.argument("name")
@click.option("--split", type=click.Choice(list(SPLITS)), default="all", show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
@click.option("--limit", type=int, default=5, show_default=True)
@output_option
@handles_errors
@calls("DatasetService.PreviewDatasetRecords")
def preview(name: str, split: str, offset: int, limit: int, output: str) -> None:
    """Print cleaned records of a dataset."""
    with client() as tunefleet:
        for record in tunefleet.datasets.preview(
            name, split=SPLITS[split], offset=offset, limit=limit
        ):
            if output == "json":
                print_json_line(record)
                continue
            where = enum_name(dataset_pb2.DatasetSplit, record.split, "DATASET_SPLIT_").lower()
            console.print(f"[bold]record {record.index}[/] (line {record.source_line}, {where})")
            for message in record.messages:
                console.print(f"  {message.role:>9}: {message.content}", markup=False)
                for made in message.tool_calls:
                    console.print(f"  {'calls':>9}: {made.name}({made.arguments})", markup=False)
            answers = [("chosen", record.chosen), ("rejected", record.rejected)]
            if record.completion:
                label = "desirable" if record.desirable else "undesirable"
                answers = [(label, record.completion)]
            for label, turns in answers:
                for message in turns:
                    console.print(f"  {label:>9}: {message.content}", markup=False)


@datasets.command()
@click.argument("dataset")
@click.argument("evaluation_dataset")
@click.option(
    "--near-duplicate-threshold",
    type=float,
    help="Jaccard similarity at which records are near duplicates, in (0, 1] (default 0.8).",
)
@output_option
@handles_errors
@calls("DatasetService.CheckContamination")
def contamination(
    dataset: str, evaluation_dataset: str, near_duplicate_threshold: float | None, output: str
) -> None:
    """How many records of EVALUATION_DATASET also appear in (training) DATASET."""
    with client() as tunefleet:
        found = tunefleet.datasets.check_contamination(
            dataset, evaluation_dataset, near_duplicate_threshold=near_duplicate_threshold
        )
    if output == "json":
        print_json(found)
        return
    leaked = found.exact_overlap + found.near_overlap
    share = leaked / found.evaluation_records if found.evaluation_records else 0.0
    fields(
        [
            ("training dataset", found.dataset),
            ("evaluation dataset", found.evaluation_dataset),
            ("evaluation records", str(found.evaluation_records)),
            ("exact overlap", str(found.exact_overlap)),
            (
                "near overlap",
                f"{found.near_overlap} (Jaccard >= {found.near_duplicate_threshold:g})",
            ),
            ("contaminated", f"{leaked} ({share:.1%})"),
        ]
    )
    if found.examples:
        table(
            ["TRAINING LINE", "EVALUATION LINE", "SIMILARITY"],
            [(e.kept_line, e.removed_line, f"{e.similarity:.2f}") for e in found.examples],
        )


@datasets.command()
@click.argument("name")
@output_option
@handles_errors
@calls("DatasetService.DeleteDataset")
def delete(name: str, output: str) -> None:
    """Delete a dataset (refused while a training job uses it)."""
    with client() as tunefleet:
        tunefleet.datasets.delete(name)
    deleted(name, output)


@datasets.group()
def leases() -> None:
    """Leases keep a dataset from deletion while something uses it (a training job holds one)."""


@leases.command("list")
@click.argument("dataset")
@output_option
@handles_errors
@calls("DatasetService.ListDatasetLeases")
def list_leases(dataset: str, output: str) -> None:
    """List DATASET's leases and their holders."""
    with client() as tunefleet:
        items = list(tunefleet.datasets.leases(dataset))
    listing(
        items,
        output,
        ["LEASE", "HOLDER", "CREATED"],
        lambda x: (x.name, x.holder, when(x.create_time)),
    )


@leases.command("create")
@click.argument("dataset")
@click.argument("lease_id", metavar="ID")
@click.option("--holder", required=True, help="Who holds it, as a resource name.")
@output_option
@handles_errors
@calls("DatasetService.CreateDatasetLease")
def create_lease(dataset: str, lease_id: str, holder: str, output: str) -> None:
    """Lease DATASET as ID for HOLDER: it cannot be deleted until the lease is."""
    with client() as tunefleet:
        lease = tunefleet.datasets.create_lease(dataset, lease_id, holder=holder)
    if output == "json":
        print_json(lease)
        return
    console.print(f"{lease.name} held by {lease.holder}", markup=False)


@leases.command("delete")
@click.argument("name")
@click.option("--allow-missing", is_flag=True, help="Succeed when it does not exist.")
@output_option
@handles_errors
@calls("DatasetService.DeleteDatasetLease")
def delete_lease(name: str, allow_missing: bool, output: str) -> None:
    """Delete a lease, datasets/{dataset}/leases/{lease} (a lease left by a job that is gone)."""
    with client() as tunefleet:
        tunefleet.datasets.delete_lease(name, allow_missing=allow_missing)
    deleted(name, output)
