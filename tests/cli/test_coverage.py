"""The CLI covers the API: every public RPC (all but the training worker's own) has a command
that calls it, read from the protos' descriptors, and every command names the RPCs it calls."""

from __future__ import annotations

import click
from google.protobuf import descriptor_pool

from tunefleet.app.services import SERVICES
from tunefleet.cli.main import cli
from tunefleet.runtime.auth import required_role
from tunefleet.v1 import auth_pb2


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Each command's path -> the RPCs it says it calls."""
    found: dict[str, tuple[str, ...]] = {}
    for name, command in group.commands.items():
        path = (*prefix, name)
        if isinstance(command, click.Group):
            found |= commands(command, path)
        else:
            found[" ".join(path)] = getattr(command.callback, "rpcs", ())
    return found


def public_rpcs() -> set[str]:
    pool = descriptor_pool.Default()
    found = set()
    for spec in SERVICES.values():
        service = pool.FindServiceByName(spec.descriptor.full_name)
        for method in service.methods:
            role = required_role(f"/{service.full_name}/{method.name}")
            if role != auth_pb2.ACCESS_ROLE_TRAINING_WORKER:
                found.add(f"{service.name}.{method.name}")
    return found


def test_every_public_rpc_has_a_command() -> None:
    covered = {rpc for rpcs in commands(cli).values() for rpc in rpcs}
    assert sorted(public_rpcs() - covered) == []
    assert sorted(covered - public_rpcs()) == []  # no command names an RPC that is not there


def test_every_command_but_serve_names_its_rpcs() -> None:
    silent = sorted(path for path, rpcs in commands(cli).items() if not rpcs)
    assert silent == ["eval suite", "serve"]  # local: the bundled suite, and the server itself


def test_every_command_prints_json_for_scripts() -> None:
    def command(path: str) -> click.Command:
        found: click.Command = cli
        for name in path.split():
            assert isinstance(found, click.Group)
            found = found.commands[name]
        return found

    without = sorted(
        path
        for path in commands(cli)
        if not any(parameter.name == "output" for parameter in command(path).params)
    )
    assert without == ["eval annotate", "serve"]  # a terminal dialogue, and the server
