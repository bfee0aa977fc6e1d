"""Model ids as OpenAI clients send them, and `/v1/models`.

The base model keeps its own name. An adapter is named by an alias or a version, without `/`
(openai-python percent-encodes path segments): `orders@prod` is `adapters/orders@prod` and
`orders:3` is `adapters/orders/versions/3`. Full resource names are accepted in request bodies.
"""

from __future__ import annotations

import re
from typing import Any

from tunefleet.client import AsyncClient, InvalidArgument, NotFound
from tunefleet.openai_front.errors import OpenAIError
from tunefleet.v1 import adapter_pb2

_ALIAS = re.compile(r"^([a-z][a-z0-9-]{0,62})@([a-z][a-z0-9-]{0,62})$")
_VERSION = re.compile(r"^([a-z][a-z0-9-]{0,62}):([1-9][0-9]{0,17})$")
_RESOURCE = re.compile(r"^adapters/[^/]+(@[^/]+|/versions/[^/]+)$")


def not_found(model: str, why: str = "") -> OpenAIError:
    return OpenAIError(
        404,
        f"The model {model!r} does not exist{why}",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def adapter_of(model: str, base_model: str) -> str:
    """The adapter a request's `model` names ("" for the base model)."""
    if not model:
        raise OpenAIError(400, "model: required", param="model", code="missing_required_parameter")
    if not base_model:
        raise OpenAIError(
            400,
            "this deployment serves no model: set inference.base_model (or openai.base_model)",
            param="model",
            code="no_base_model",
        )
    if model == base_model:
        return ""
    if _RESOURCE.match(model):
        return model
    if match := _ALIAS.match(model):
        return f"adapters/{match[1]}@{match[2]}"
    if match := _VERSION.match(model):
        return f"adapters/{match[1]}/versions/{int(match[2])}"
    raise not_found(
        model,
        f": this server serves {base_model!r} and its adapters as name@alias or name:version",
    )


def version_id(version: str) -> str:
    """`adapters/orders/versions/3` as a model id, `orders:3`."""
    _, adapter, _, number = version.split("/")
    return f"{adapter}:{number}"


def _model(model_id: str, root: str, parent: str | None, created: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "tunefleet",
        "root": root,
        "parent": parent,
    }


def servable(version: adapter_pb2.AdapterVersion) -> bool:
    """Whether some engine can serve the version as an adapter."""
    return version.kind == adapter_pb2.AdapterVersion.KIND_ADAPTER and any(
        engine.compatible for engine in version.compatibility
    )


async def _models_of(
    client: AsyncClient, adapter: adapter_pb2.Adapter, base_model: str
) -> list[dict[str, Any]]:
    """The aliases and versions of one adapter that an engine can serve."""
    short = adapter.name.removeprefix("adapters/")
    versions = {}
    async for version in client.adapters.versions(adapter.name):
        if servable(version):
            versions[version.version] = version
    created = adapter.create_time.seconds
    models = [
        _model(f"{short}@{alias}", f"{adapter.name}@{alias}", base_model, created)
        for alias, number in sorted(adapter.aliases.items())
        if number in versions
    ]
    models += [
        _model(f"{short}:{number}", version.name, base_model, version.create_time.seconds)
        for number, version in sorted(versions.items())
    ]
    return models


async def list_models(client: AsyncClient, base_model: str) -> list[dict[str, Any]]:
    """The base model, then every alias and version of its adapters that an engine can serve
    (nothing when this deployment serves no model)."""
    if not base_model:
        return []
    models = [_model(base_model, base_model, None, 0)]
    async for adapter in client.adapters.list(filter=f'base_model = "{base_model}"'):
        models += await _models_of(client, adapter, base_model)
    return models


async def get_model(client: AsyncClient, base_model: str, model_id: str) -> dict[str, Any]:
    """One model of `list_models` (by id or resource name), or 404."""
    wanted = adapter_of(model_id, base_model)
    if not wanted:
        return _model(base_model, base_model, None, 0)
    name = wanted.split("@")[0].split("/versions/")[0]
    try:
        adapter = await client.adapters.get(name)
    except (NotFound, InvalidArgument):
        raise not_found(model_id) from None
    if adapter.base_model == base_model:
        for model in await _models_of(client, adapter, base_model):
            if model["root"] == wanted:
                return model
    raise not_found(model_id, f": no version that {base_model!r} can serve has that name")
