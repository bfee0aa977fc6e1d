"""`tunefleet adapters ...`"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import click
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

from tunefleet.cli.output import (
    client,
    console,
    handles_errors,
    listing,
    output_option,
    print_json,
    size,
    when,
)


@click.group()
def adapters() -> None:
    """Adapters, their immutable versions and movable aliases."""


@adapters.command("list")
@click.option("--filter", "filter_text", default="", help="Such as base_model=smollm2.")
@output_option
@handles_errors
def list_adapters(filter_text: str, output: str) -> None:
    """List adapters with their aliases."""
    with client() as tunefleet:
        items = list(tunefleet.adapters.list(filter=filter_text))
    listing(
        items,
        output,
        ["NAME", "BASE MODEL", "LATEST", "ALIASES", "UPDATED"],
        lambda a: (
            a.name,
            a.base_model,
            a.latest_version or "-",
            ", ".join(f"{k}->{v}" for k, v in sorted(a.aliases.items())) or "-",
            when(a.update_time),
        ),
    )


@adapters.command()
@click.argument("adapter")
@output_option
@handles_errors
def versions(adapter: str, output: str) -> None:
    """List an adapter's versions, newest first, with their lineage and metrics."""
    with client() as tunefleet:
        items = list(tunefleet.adapters.versions(adapter))
    listing(
        items,
        output,
        ["VERSION", "SIZE", "RANK", "ALIASES", "TRAINING JOB", "VALIDATION LOSS", "CREATED"],
        lambda v: (
            v.name,
            size(v.size_bytes),
            v.config.rank or "-",
            ", ".join(alias.rsplit("/", 1)[-1] for alias in v.aliases) or "-",
            v.lineage.training_job or "-",
            validation(v.lineage.metrics),
            when(v.create_time),
        ),
    )


def validation(metrics: Mapping[str, float]) -> str:
    if "validation_loss" not in metrics:
        return "-"
    base = metrics.get("base_validation_loss")
    return f"{metrics['validation_loss']:.4f}" + (f" (base {base:.4f})" if base else "")


@adapters.group()
def alias() -> None:
    """Move aliases (such as prod) between versions."""


@alias.command("set")
@click.argument("adapter")
@click.argument("alias_name", metavar="ALIAS")
@click.argument("version")
@click.option("--reason", default="", help="Recorded in the audit trail.")
@click.option(
    "--expect",
    "expected_version",
    default=None,
    help="Move only if the alias now points at this version ('' = only if it does not exist).",
)
@output_option
@handles_errors
def set_alias(
    adapter: str,
    alias_name: str,
    version: str,
    reason: str,
    expected_version: str | None,
    output: str,
) -> None:
    """Point ALIAS of ADAPTER at VERSION (a number or adapters/{a}/versions/{n}). Servers that
    route the alias switch to the new version without a restart."""
    target: str | int = int(version) if version.isdigit() else version
    with client() as tunefleet:
        moved = tunefleet.adapters.set_alias(
            adapter, alias_name, target, reason=reason, expected_version=expected_version
        )
    if output == "json":
        print_json(moved)
        return
    console.print(f"{moved.name} -> {moved.version}", markup=False)


@alias.command("canary")
@click.argument("adapter")
@click.argument("alias_name", metavar="ALIAS")
@click.argument("other", metavar="OTHER")
@click.argument("percent", type=click.IntRange(0, 99))
@click.option("--reason", default="", help="Recorded in the audit trail.")
@output_option
@handles_errors
def canary(
    adapter: str, alias_name: str, other: str, percent: int, reason: str, output: str
) -> None:
    """Send PERCENT of ALIAS's requests to the version alias OTHER points at (0 stops it):
    `tunefleet adapters alias canary orders prod candidate 10`. Responses name the version that
    answered; a request's routing key keeps a user on one side."""
    with client() as tunefleet:
        changed = tunefleet.adapters.set_canary(adapter, alias_name, other, percent, reason=reason)
    if output == "json":
        print_json(changed)
        return
    split = (
        f"{changed.canary.percent}% to {changed.canary.alias}"
        if changed.HasField("canary")
        else "no canary"
    )
    console.print(f"{changed.name} -> {changed.version}, {split}", markup=False)


@adapters.command()
@click.argument("version")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@output_option
@handles_errors
def download(version: str, directory: Path, output: str) -> None:
    """Download VERSION's files (checked against their sha256) into DIRECTORY."""
    progress = Progress(
        "[progress.description]{task.description}",
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
        disable=output == "json",
    )
    with progress, client() as tunefleet:
        task = progress.add_task(f"downloading {version}", total=None)
        paths = tunefleet.adapters.download(
            version, directory, on_progress=lambda done, _: progress.update(task, completed=done)
        )
    if output == "json":
        print_json({"version": version, "files": [str(p) for p in paths]})
        return
    for path in paths:
        console.print(f"{path} ({size(path.stat().st_size)})", markup=False)
