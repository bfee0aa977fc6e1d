"""The `tunefleet` command."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from tunefleet.cli.adapters import adapters
from tunefleet.cli.datasets import datasets
from tunefleet.cli.evaluations import evaluations
from tunefleet.cli.generate import feedback, generate
from tunefleet.cli.jobs import jobs
from tunefleet.cli.output import Settings
from tunefleet.cli.retraining import retraining
from tunefleet.cli.serving import score, served

SERVICE_KEYS = (
    "datasets",
    "training",
    "adapters",
    "inference",
    "evaluation",
    "retraining",
    "openai",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tunefleet")
@click.option(
    "--target",
    envvar="TUNEFLEET_TARGET",
    default="localhost:50051",
    show_default=True,
    help="host:port of the server (env TUNEFLEET_TARGET).",
)
@click.option("--token", envvar="TUNEFLEET_TOKEN", help="Bearer token (env TUNEFLEET_TOKEN).")
@click.option("--tls", is_flag=True, envvar="TUNEFLEET_TLS", help="Connect with TLS.")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="TUNEFLEET_CA_FILE",
    help="CA certificate to trust (implies --tls).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    envvar="TUNEFLEET_TIMEOUT",
    help="Deadline in seconds of each call, uploads included (env TUNEFLEET_TIMEOUT); "
    "default: 30 s for a call, none for an upload.",
)
@click.pass_context
def cli(
    context: click.Context,
    target: str,
    token: str | None,
    tls: bool,
    ca_file: Path | None,
    timeout: float | None,
) -> None:
    """tunefleet: fine-tune open LLMs and serve the adapters.

    \b
    tunefleet serve                                  run the services
    tunefleet datasets upload data.jsonl             ingest a dataset
    tunefleet jobs create --base-model M --dataset D --adapter adapters/a -f
    tunefleet adapters alias set a prod 2            move prod to version 2
    tunefleet generate --chat --adapter adapters/a@prod "Hello"
    tunefleet eval create --dataset D --candidate base --candidate new=adapters/a@prod \
        --grader exact_match --gate exact_match -w    judge it against the base model

    Exit codes: 0 done, 1 the server refused or failed, 2 bad input, 3 a gate did not pass.
    """
    context.obj = Settings(target, token, tls, ca_file, timeout)


cli.add_command(datasets)
cli.add_command(jobs)
cli.add_command(adapters)
cli.add_command(generate)
cli.add_command(feedback)
cli.add_command(evaluations)
cli.add_command(retraining)
cli.add_command(served)
cli.add_command(score)


@cli.command()
@click.argument("services", nargs=-1, type=click.Choice(SERVICE_KEYS))
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TUNEFLEET_CONFIG",
    help="YAML settings file (environment variables TUNEFLEET_* override it).",
)
@click.option(
    "--exit-with-parent",
    is_flag=True,
    help="Also stop (as on SIGTERM) when the process that started this one dies.",
)
def serve(services: tuple[str, ...], config_file: Path | None, exit_with_parent: bool) -> None:
    """Run tunefleet services until SIGTERM.

    With no SERVICES, all of them run in one process on one port, with the OpenAI-compatible HTTP
    API on its own (openai.port, default 8000): the embedded shape. Otherwise only those named
    (the cluster shape, one service per process; `openai` is the HTTP front alone).
    """
    try:
        from tunefleet.app.process import serve as run_server
        from tunefleet.runtime.settings import SettingsError, load_settings
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise click.ClickException(
            f"the server needs the [server] extra: pip install 'tunefleet[server]' ({exc})"
        ) from None
    try:
        settings = load_settings(config_file)
        asyncio.run(run_server(settings, services, exit_with_parent))
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
