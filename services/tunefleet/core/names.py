"""Resource names the services share: the registry's `adapters/{adapter}`,
`adapters/{adapter}/versions/{n}`, `adapters/{adapter}@{alias}` and
`adapters/{adapter}/aliases/{alias}`; datasets' `datasets/{dataset}` and
`datasets/{dataset}/leases/{lease}`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunefleet.core.errors import InvalidArgument

ID = r"[a-z][a-z0-9-]{0,62}"
_ID = re.compile(rf"^{ID}$")
_ADAPTER = re.compile(rf"^adapters/(?P<adapter>{ID})$")
_VERSION = re.compile(rf"^adapters/(?P<adapter>{ID})/versions/(?P<version>[1-9][0-9]{{0,8}})$")
_AT_ALIAS = re.compile(rf"^adapters/(?P<adapter>{ID})@(?P<alias>{ID})$")
_ALIAS = re.compile(rf"^adapters/(?P<adapter>{ID})/aliases/(?P<alias>{ID})$")


@dataclass(frozen=True)
class VersionRef:
    """A version named by number, or by an alias to resolve."""

    adapter: str
    version: int | None = None
    alias: str | None = None


def check_id(value: str, field: str) -> str:
    if not _ID.match(value):
        raise InvalidArgument(
            field,
            f"{value!r} must be 1-63 lowercase letters, digits or hyphens, starting with a letter",
        )
    return value


def adapter_id(name: str, field: str = "name") -> str:
    match = _ADAPTER.match(name)
    if match is None:
        raise InvalidArgument(field, f"{name!r} is not an adapter name (adapters/{{adapter}})")
    return match["adapter"]


def version_ref(name: str, field: str = "name") -> VersionRef:
    if match := _VERSION.match(name):
        return VersionRef(match["adapter"], version=int(match["version"]))
    if match := _AT_ALIAS.match(name):
        return VersionRef(match["adapter"], alias=match["alias"])
    raise InvalidArgument(
        field,
        f"{name!r} is not a version name (adapters/{{adapter}}/versions/{{n}} or "
        "adapters/{adapter}@{alias})",
    )


def alias_name(name: str, field: str = "name") -> tuple[str, str]:
    match = _ALIAS.match(name)
    if match is None:
        raise InvalidArgument(
            field, f"{name!r} is not an alias name (adapters/{{adapter}}/aliases/{{alias}})"
        )
    return match["adapter"], match["alias"]


def version_name(adapter: str, version: int) -> str:
    return f"adapters/{adapter}/versions/{version}"


def dataset_id(name: str, field: str = "name") -> str:
    """The id in `datasets/{id}`; INVALID_ARGUMENT naming `field` for anything else."""
    prefix, _, identifier = name.partition("/")
    if prefix != "datasets" or not identifier or "/" in identifier:
        raise InvalidArgument(field, f"{name!r} is not a dataset name (datasets/{{dataset}})")
    return identifier


def lease_name(name: str) -> tuple[str, str]:
    """The dataset and lease ids in `datasets/{dataset}/leases/{lease}`."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "datasets" or parts[2] != "leases" or "" in parts:
        raise InvalidArgument(
            "name", f"{name!r} is not a lease name (datasets/{{dataset}}/leases/{{lease}})"
        )
    return parts[1], parts[3]
