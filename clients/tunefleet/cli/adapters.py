"""`tunefleet adapters ...`"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from tunefleet.cli.output import (
    as_dict,
    calls,
    client,
    console,
    deleted,
    handles_errors,
    listing,
    output_option,
    print_json,
    print_json_line,
    show,
    size,
    when,
)
from tunefleet.client.adapters import EXPORT_FORMATS
from tunefleet.client.adapters import export_format as parse_format
from tunefleet.v1 import adapter_pb2


@click.group()
def adapters() -> None:
    """Adapters, their immutable versions and movable aliases."""


@adapters.command("list")
@click.option("--filter", "filter_text", default="", help="Such as base_model=smollm2.")
@output_option
@handles_errors
@calls("AdapterService.ListAdapters")
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
@calls("AdapterService.ListAdapterVersions")
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
@calls("AdapterService.SetAdapterAlias")
def set_alias(
    adapter: str,
    alias_name: str,
    version: str,
    reason: str,
    expected_version: str | None,
    output: str,
) -> None:
    """Point ALIAS of ADAPTER at VERSION (a number, orders:3 or adapters/{a}/versions/{n}).
    Servers that route the alias switch to the new version without a restart. --expect takes
    the same forms."""
    target: str | int = int(version) if version.isdigit() else version_name(version)
    if expected_version:
        expected_version = version_name(expected_version)
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
@calls("AdapterService.SetAdapterAliasCanary")
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


def version_name(text: str) -> str:
    """`orders:3` -> `adapters/orders/versions/3` and `orders@prod` -> `adapters/orders@prod`;
    full names as given."""
    match = re.fullmatch(r"([a-z][a-z0-9-]*)(?::(\d+)|@([a-z][a-z0-9-]*))", text)
    if match is None:
        return text
    adapter, number, alias = match.groups()
    return f"adapters/{adapter}/versions/{number}" if number else f"adapters/{adapter}@{alias}"


def transfer_progress(output: str) -> Progress:
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
        disable=output == "json",
    )


@adapters.command()
@click.argument("version")
@click.option(
    "--format",
    "export_format",
    type=click.Choice(EXPORT_FORMATS),
    default="gguf-q8_0",
    show_default=True,
    help="GGUF (one file) for llama.cpp, Ollama and LM Studio; bnb (a checkpoint folder) for "
    "transformers and the PEFT engine.",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Where to write it: a file (model.gguf) for GGUF, a new folder for bnb.",
)
@click.option(
    "--min-agreement",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Least top-1 agreement with the full model that passes; default the server's (0.95).",
)
@click.option("--keep-failed", is_flag=True, help="Store an export that fails the check anyway.")
@click.option(
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="json: machine-readable output for scripts.",
)
@handles_errors
@calls("AdapterService.GetAdapterVersion", "AdapterService.QuantizeModelVersion")
def export(
    version: str,
    export_format: str,
    out: Path,
    min_agreement: float | None,
    keep_failed: bool,
    output: str,
) -> None:
    """Export VERSION (orders:3, orders@prod or a full name): an adapter is merged into its base
    model, quantized, checked against the merged model, stored as a new version and downloaded.
    A version that is already such an export is downloaded as it is.

    \b
    tunefleet adapters export orders:3 --format gguf-q8_0 -o model.gguf
    llama-cli -m model.gguf -cnv
    """
    if out.is_dir():
        raise click.BadParameter(f"{out} is a folder that exists already", param_hint="--out")
    name = version_name(version)
    with client() as tunefleet:
        found = tunefleet.adapters.get_version(name)
        if found.format != parse_format(export_format):
            if output != "json":
                console.print(f"quantizing {found.name} to {export_format} and checking it ...")
            found = tunefleet.adapters.quantize(
                found.name,
                export_format,
                min_top1_agreement=min_agreement or 0.0,
                keep_failed_export=keep_failed,
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        progress = transfer_progress(output)
        with (
            progress,
            tempfile.TemporaryDirectory(dir=out.parent, ignore_cleanup_errors=True) as temporary,
        ):
            task = progress.add_task(f"downloading {found.name}", total=found.size_bytes)
            paths = tunefleet.adapters.download(
                found.name,
                temporary,
                on_progress=lambda done, _: progress.update(task, completed=done),
            )
            # One file (GGUF) becomes OUT; a checkpoint's files, the folder OUT.
            shutil.move(paths[0] if len(paths) == 1 else temporary, out)
    check = found.export_check
    if output == "json":
        print_json({"version": as_dict(found), "path": str(out)})
        return
    result = "passed" if check.result == check.RESULT_PASSED else "FAILED"
    console.print(
        f"{out} ({size(found.size_bytes)}): {found.name}, from "
        f"{found.quantized_from}; check {result}: top-1 agreement {check.top1_agreement:.1%} "
        f"(least {check.min_top1_agreement:.1%}), KL {check.kl_divergence:.4f} over "
        f"{check.positions} positions",
        markup=False,
    )


@adapters.command()
@click.argument("version")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@output_option
@handles_errors
@calls("AdapterService.GetAdapterVersion", "AdapterService.DownloadAdapterVersion")
def download(version: str, directory: Path, output: str) -> None:
    """Download VERSION's files (checked against their sha256) into DIRECTORY."""
    version = version_name(version)
    progress = transfer_progress(output)
    with progress, client() as tunefleet:
        found = tunefleet.adapters.get_version(version)
        task = progress.add_task(f"downloading {version}", total=found.size_bytes)
        paths = tunefleet.adapters.download(
            version, directory, on_progress=lambda done, _: progress.update(task, completed=done)
        )
    if output == "json":
        print_json({"version": version, "files": [str(p) for p in paths]})
        return
    for path in paths:
        console.print(f"{path} ({size(path.stat().st_size)})", markup=False)


@adapters.command()
@click.argument("adapter_id", metavar="ID")
@click.option("--base-model", required=True, help="The model every version is trained from.")
@click.option("--description", default="")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE, repeatable.")
@output_option
@handles_errors
@calls("AdapterService.CreateAdapter")
def create(
    adapter_id: str, base_model: str, description: str, labels: tuple[str, ...], output: str
) -> None:
    """Create adapter ID (a named line of versions) for a base model."""
    pairs = dict(label.partition("=")[::2] for label in labels)
    if any(not key or not value for key, value in pairs.items()) or len(pairs) < len(labels):
        raise click.BadParameter("labels are KEY=VALUE, each key once", param_hint="--label")
    with client() as tunefleet:
        created = tunefleet.adapters.create(
            adapter_id, base_model=base_model, description=description, labels=pairs
        )
    show(created, output)


@adapters.command()
@click.argument("name")
@output_option
@handles_errors
@calls("AdapterService.GetAdapter", "AdapterService.GetAdapterVersion")
def get(name: str, output: str) -> None:
    """Show an adapter (orders) or one version (orders:3, orders@prod, a full name)."""
    with client() as tunefleet:
        if is_version(name):
            show(tunefleet.adapters.get_version(version_name(name)), output)
        else:
            show(tunefleet.adapters.get(name), output)


@adapters.command()
@click.argument("name")
@output_option
@handles_errors
@calls("AdapterService.DeleteAdapter", "AdapterService.DeleteAdapterVersion")
def delete(name: str, output: str) -> None:
    """Delete an adapter with all its versions (orders), or one version (orders:3) that no alias
    points at."""
    with client() as tunefleet:
        if is_version(name):
            name = version_name(name)
            tunefleet.adapters.delete_version(name)
        else:
            tunefleet.adapters.delete(name)
    deleted(name, output)


@adapters.command()
@click.argument("adapter")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--description", default="")
@output_option
@handles_errors
@calls("AdapterService.UploadAdapterVersion")
def upload(adapter: str, directory: Path, description: str, output: str) -> None:
    """Upload a PEFT adapter folder (adapter_config.json and weights) as a new version of
    ADAPTER; the server checks it against the base model before it is visible."""
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    progress = transfer_progress(output)
    with progress, client() as tunefleet:
        task = progress.add_task(f"uploading {directory}", total=total)
        version = tunefleet.adapters.upload_version(
            adapter,
            directory,
            description=description,
            on_progress=lambda done, _: progress.update(task, completed=done),
        )
    show(version, output)


@adapters.command()
@click.argument("adapter")
@click.option(
    "--file",
    "files",
    multiple=True,
    required=True,
    help="PATH=URI: a file of the version and the blob it is in (repeatable).",
)
@click.option("--description", default="")
@output_option
@handles_errors
@calls("AdapterService.CreateAdapterVersion")
def register(adapter: str, files: tuple[str, ...], description: str, output: str) -> None:
    """Register files already in the server's blob store as a new version of ADAPTER (what a
    trainer does), checked like an upload."""
    pairs = dict(item.partition("=")[::2] for item in files)
    if any(not path or not uri for path, uri in pairs.items()) or len(pairs) < len(files):
        raise click.BadParameter("files are PATH=URI, each path once", param_hint="--file")
    with client() as tunefleet:
        version = tunefleet.adapters.register_version(adapter, pairs, description=description)
    show(version, output)


@adapters.command()
@click.argument("version")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None)
@output_option
@handles_errors
@calls("AdapterService.MergeAdapterVersion")
def merge(version: str, dtype: str | None, output: str) -> None:
    """Merge VERSION into its base model's weights, stored as a new full-model version (default:
    in the base model's own precision)."""
    with client() as tunefleet:
        merged = tunefleet.adapters.merge(version_name(version), dtype=dtype or "")
    show(merged, output)


@adapters.command()
@click.argument("adapter", required=False, default="")
@click.option("--after", "after_revision", type=int, default=0, help="Changes after this revision.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Stop after N changes.")
@output_option
@handles_errors
@calls("AdapterService.WatchAdapterChanges")
def watch(adapter: str, after_revision: int, limit: int | None, output: str) -> None:
    """Print registry changes (of ADAPTER, or all) as they happen, from --after: versions added,
    aliases moved, deletions. JSON lines with -o json. Ctrl-C stops."""
    with client() as tunefleet:
        for count, change in enumerate(
            tunefleet.adapters.watch(after_revision=after_revision, adapter=adapter), 1
        ):
            if output == "json":
                print_json_line(change)
            else:
                kind = adapter_pb2.AdapterChange.Type.Name(change.type).removeprefix("TYPE_")
                what = " -> ".join(filter(None, [change.alias, change.version])) or change.adapter
                console.print(f"{change.revision:>6}  {kind:<18} {what}", markup=False)
            if limit is not None and count >= limit:
                return


@alias.command("list")
@click.argument("adapter")
@output_option
@handles_errors
@calls("AdapterService.ListAdapterAliases")
def list_aliases(adapter: str, output: str) -> None:
    """List ADAPTER's aliases, the version each points at and its canary."""
    with client() as tunefleet:
        items = list(tunefleet.adapters.aliases(adapter))
    listing(
        items,
        output,
        ["ALIAS", "VERSION", "CANARY", "MOVED", "BY"],
        lambda a: (
            a.name,
            a.version,
            f"{a.canary.percent}% to {a.canary.alias}" if a.HasField("canary") else "-",
            when(a.update_time),
            a.updated_by or "-",
        ),
    )


@alias.command("delete")
@click.argument("adapter")
@click.argument("alias_name", metavar="ALIAS")
@click.option("--reason", default="", help="Recorded in the audit trail.")
@output_option
@handles_errors
@calls("AdapterService.DeleteAdapterAlias")
def delete_alias(adapter: str, alias_name: str, reason: str, output: str) -> None:
    """Delete ALIAS of ADAPTER (servers stop routing it)."""
    with client() as tunefleet:
        tunefleet.adapters.delete_alias(adapter, alias_name, reason=reason)
    name = f"adapters/{adapter.removeprefix('adapters/')}/aliases/{alias_name}"
    deleted(name, output)


@alias.command("moves")
@click.argument("adapter")
@output_option
@handles_errors
@calls("AdapterService.ListAliasMoves")
def moves(adapter: str, output: str) -> None:
    """The audit trail of ADAPTER's alias moves, newest first: who, when, from, to and why."""
    with client() as tunefleet:
        items = list(tunefleet.adapters.alias_moves(adapter))
    listing(
        items,
        output,
        ["ALIAS", "FROM", "TO", "WHEN", "BY", "REASON"],
        lambda m: (
            m.alias,
            m.from_version or "-",
            m.to_version or "-",
            when(m.time),
            m.actor,
            m.reason or "-",
        ),
    )


def is_version(name: str) -> bool:
    """orders:3, orders@prod and full version names; not orders or adapters/orders."""
    return ":" in name or "@" in name or "/versions/" in name
