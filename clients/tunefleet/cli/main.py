"""The `tunefleet` command."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

SERVICE_KEYS = ("datasets", "training", "adapters", "inference")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tunefleet")
def cli() -> None:
    """tunefleet: fine-tune open LLMs and serve the adapters."""


@cli.command()
@click.argument("services", nargs=-1, type=click.Choice(SERVICE_KEYS))
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TUNEFLEET_CONFIG",
    help="YAML settings file (environment variables TUNEFLEET_* override it).",
)
def serve(services: tuple[str, ...], config_file: Path | None) -> None:
    """Run tunefleet services until SIGTERM.

    With no SERVICES, all four run in one process on one port (the embedded shape); otherwise
    only those named (the cluster shape, one service per process).
    """
    try:
        from tunefleet.runtime.app import serve as run_server
        from tunefleet.runtime.settings import SettingsError, load_settings
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise click.ClickException(
            f"the server needs the [server] extra: pip install 'tunefleet[server]' ({exc})"
        ) from None
    try:
        settings = load_settings(config_file)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    asyncio.run(run_server(settings, services))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
