"""Which models a request may name: catalogue names always; local folders anywhere with auth
off (the embedded shape), only under `model_roots` with auth on, refused in the same words
whether the folder exists or not."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunefleet.core.errors import InvalidArgument
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.runtime.settings import load_settings


def model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def refusal(catalogue: ModelCatalogue, name: str) -> str:
    with pytest.raises(InvalidArgument) as refused:
        catalogue.resolve(name, "base_model")
    assert refused.value.field == "base_model"
    return refused.value.message.replace(name, "NAME")


def test_auth_off_takes_any_local_model_folder(tmp_path: Path) -> None:
    anywhere = model(tmp_path / "anywhere")
    catalogue = ModelCatalogue.of(load_settings(data_dir=tmp_path, models={"m": anywhere}))
    assert catalogue.roots is None
    assert catalogue.resolve(str(anywhere), "base_model") == anywhere
    assert catalogue.resolve("m", "base_model") == anywhere
    assert refusal(catalogue, str(tmp_path)) == refusal(catalogue, "/no/such")  # not a model


def test_auth_on_takes_folders_under_the_roots_only(tmp_path: Path) -> None:
    root = tmp_path / "models"
    inside = model(root / "team-a" / "llama")
    outside = model(tmp_path / "team-b" / "secret-model")
    (root / "link").symlink_to(outside)
    settings = load_settings(
        data_dir=tmp_path,
        models={"named": outside},
        model_roots=[root],
        server={"auth": {"enabled": True, "tokens_file": tmp_path / "tokens.yaml"}},
    )
    catalogue = ModelCatalogue.of(settings)
    assert catalogue.resolve(str(inside), "base_model") == inside
    assert catalogue.resolve("named", "base_model") == outside  # the operator's own choice
    words = {
        refusal(catalogue, name)
        for name in (
            str(outside),  # exists, outside the roots
            str(root / "link"),  # a link out of a root
            str(root / ".." / "team-b" / "secret-model"),  # climbing out
            "/no/such/model",
            "/etc",
            "/" + "d" * 300,
        )
    }
    assert words == {
        "base_model: 'NAME' is neither a known model (named) nor a model under the allowed roots"
    }


def test_auth_on_without_roots_takes_names_only(tmp_path: Path) -> None:
    folder = model(tmp_path / "m")
    settings = load_settings(
        data_dir=tmp_path,
        server={"auth": {"enabled": True, "tokens_file": tmp_path / "tokens.yaml"}},
    )
    catalogue = ModelCatalogue.of(settings)
    assert catalogue.roots == ()
    assert (
        refusal(catalogue, str(folder))
        == "base_model: 'NAME' is not a known model (none configured)"
    )
    assert catalogue.find(str(folder)) is None
