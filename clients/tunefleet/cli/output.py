"""How the CLI talks to the user: the client from the global options, tables or JSON, and one-line
errors with a non-zero exit code."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from tunefleet.client import TLS, Client, Options, TunefleetError

F = TypeVar("F", bound=Callable[..., Any])
MessageT = TypeVar("MessageT", bound=Message)
# Piped output is not wrapped at 80 columns: names stay whole for scripts and copying.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1000)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


class Settings:
    """The global options, kept on the click context."""

    def __init__(
        self,
        target: str,
        token: str | None,
        tls: bool,
        ca_file: Path | None,
        timeout: float | None = None,
    ) -> None:
        self.target, self.token, self.tls, self.ca_file = target, token, tls, ca_file
        self.timeout = timeout

    def options(self) -> Options:
        """The SDK's defaults, or `--timeout` for every call, uploads included."""
        if self.timeout is None:
            return Options()
        return Options(timeout=self.timeout, stream_timeout=self.timeout)

    def client(self) -> Client:
        tls: bool | TLS = TLS(ca_file=self.ca_file) if self.ca_file else self.tls
        return Client(self.target, token=self.token, tls=tls, options=self.options())


def calls(*rpcs: str) -> Callable[[F], F]:
    """Name the RPCs (`Service.Method`) a command calls: a test checks from the protos'
    descriptors that every public RPC has a command."""

    def mark(command: F) -> F:
        command.rpcs = rpcs  # type: ignore[attr-defined]
        return command

    return mark


def client() -> Client:
    settings: Settings = click.get_current_context().find_object(Settings)  # type: ignore[assignment]
    return settings.client()


output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="json: machine-readable output for scripts.",
)


def handles_errors(command: F) -> F:
    """Turn SDK errors into one line on stderr and exit code 1 (2 for bad input)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except TunefleetError as error:
            hint = ""
            if error.code.name == "UNAVAILABLE":
                settings = click.get_current_context().find_object(Settings)
                hint = f" (is a server running at {settings.target if settings else '?'}?)"
            errors.print(f"error: {error}{hint}", markup=False)
            sys.exit(2 if error.code.name == "INVALID_ARGUMENT" else 1)
        except KeyboardInterrupt:
            errors.print("interrupted")
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def print_json(value: Message | Sequence[Message] | dict[str, Any]) -> None:
    if isinstance(value, Message):
        data: Any = as_dict(value)
    elif isinstance(value, dict):
        data = value
    else:
        data = [as_dict(item) for item in value]
    click.echo(json.dumps(data, indent=2))


def print_json_line(message: Message) -> None:
    click.echo(json.dumps(as_dict(message)), nl=True)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Rows under a header; the first column (the resource name) is never cut or wrapped."""
    cells = [[str(cell) for cell in row] for row in rows]
    if not cells:
        console.print("(none)")
        return
    view = Table(box=None, header_style="bold", pad_edge=False)
    for index, column in enumerate(columns):
        if index == 0:
            view.add_column(column, no_wrap=True, min_width=max(len(row[0]) for row in cells))
        else:
            view.add_column(column)
    for row in cells:
        view.add_row(*(Text(cell) for cell in row), end_section=False)  # no markup: [x] stays
    console.print(view)


def listing(
    items: Sequence[MessageT],
    output: str,
    columns: Sequence[str],
    row: Callable[[MessageT], Sequence[Any]],
) -> None:
    """Resources as JSON (`-o json`), or as a table of `row(item)` under `columns`."""
    if output == "json":
        print_json(items)
        return
    table(columns, [row(item) for item in items])


def fields(pairs: Iterable[tuple[str, Any]]) -> None:
    """A key-value view of one resource."""
    view = Table(box=None, show_header=False, pad_edge=False)
    view.add_column(style="bold")
    view.add_column()
    for key, value in pairs:
        view.add_row(Text(key), Text(str(value)))
    console.print(view)


def show(message: Message, output: str) -> None:
    """One resource: as JSON, or its fields as the API's JSON names them."""
    if output == "json":
        print_json(message)
        return
    fields(
        (key, value if isinstance(value, str) else json.dumps(value))
        for key, value in as_dict(message).items()
    )


def deleted(name: str, output: str) -> None:
    """What a delete command prints: `{"deleted": NAME}` for scripts, else a line."""
    if output == "json":
        print_json({"deleted": name})
    else:
        console.print(f"deleted {name}", markup=False)


def counting_progress(output: str) -> Progress:
    """A bar counting steps or answers with the ETA, gone when done; off for `-o json`."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        "ETA",
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=output == "json",
    )


def when(stamp: timestamp_pb2.Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return "-"
    return datetime.fromtimestamp(stamp.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(count)  # pragma: no cover
