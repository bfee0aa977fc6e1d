"""`tunefleet datasets ...`"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from tunefleet.cli.output import (
    client,
    console,
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
                f"{tokens.total_tokens} ({tokens.tokenizer_model or 'no tokenizer'}), "
                f"{tokens.tokens_per_record.mean:.0f} per record, "
                f"{tokens.records_over_max_length} over {tokens.max_sequence_length}",
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
@click.option("--validation-fraction", type=float, help="Share of records held out (0-0.5).")
@click.option("--tokenizer-model", default="", help="Model whose tokenizer measures the tokens.")
@click.option("--max-sequence-length", type=int, help="Count records longer than this.")
@click.option("--pii", type=click.Choice(["report", "redact", "drop"]), help="PII policy.")
@click.option("--keep-duplicates", is_flag=True, help="Do not remove duplicate records.")
@click.option("--validate-only", is_flag=True, help="Report without storing the dataset.")
@output_option
@handles_errors
def upload(
    path: Path,
    display_name: str,
    description: str,
    labels: dict[str, str],
    validation_fraction: float | None,
    tokenizer_model: str,
    max_sequence_length: int | None,
    pii: str | None,
    keep_duplicates: bool,
    validate_only: bool,
    output: str,
) -> None:
    """Upload a dataset file (Alpaca, ShareGPT, OpenAI chat or prompt/completion JSON lines)."""
    options: dict[str, Any] = {"tokenizerModel": tokenizer_model}
    if validation_fraction is not None:
        options["validationFraction"] = validation_fraction
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


@datasets.command("list")
@click.option("--filter", "filter_text", default="", help="Such as state=READY or labels.team=x.")
@output_option
@handles_errors
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


@datasets.command()
@click.argument("name")
@handles_errors
def delete(name: str) -> None:
    """Delete a dataset (refused while a training job uses it)."""
    with client() as tunefleet:
        tunefleet.datasets.delete(name)
    console.print(f"deleted {name}", markup=False)
