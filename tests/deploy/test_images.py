"""deploy/images: the Dockerfiles pass hadolint, build in stages and run as the user the manifests
expect, and their locks pin a version of everything the package asks for, within its ranges.
(No Docker engine here: `make images` itself runs where there is one.)"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.test_manifests import by_kind, render
from tunefleet import demo
from tunefleet.client import Client
from tunefleet.demo.server import LocalServer
from tunefleet.runtime.settings import KubernetesSettings
from tunefleet.training import manifests

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
# image -> (the extras it installs, its Python)
CONTENTS = {
    "services": (["server", "train"], "3.11"),
    "trainer": (["server", "train"], "3.11"),
    "vllm": (["server", "vllm"], "3.12"),
}


def dockerfile(image: str) -> str:
    return (IMAGES / f"{image}.Dockerfile").read_text()


def lock(image: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (IMAGES / f"{image}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    files = sorted(str(path) for path in IMAGES.glob("*.Dockerfile"))
    assert len(files) == 3
    result = subprocess.run([str(hadolint), *files], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", sorted(CONTENTS))
def test_images_build_in_stages_and_run_unprivileged(image: str) -> None:
    text = dockerfile(image)
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) == 2 and stages[0].startswith("${PYTHON_IMAGE}")
    python = CONTENTS[image][1]
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert re.fullmatch(rf"python:{re.escape(python)}\.\d+-slim-bookworm", base)  # a patch release
    assert f"COPY deploy/images/{image}.txt" in text
    assert "pip install --no-deps" in text and "pip check" in text
    # The last USER is the one the Deployments and trainer Jobs run as.
    assert re.findall(r"^USER (\S+)$", text, re.MULTILINE)[-1] == "10001:10001"


def test_the_manifests_run_as_the_images_user_and_name_the_images() -> None:
    deployments = by_kind(render("gpu"), "Deployment")
    deployments.pop("tunefleet-gateway")  # nginx's own image
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001
        (image,) = {c["image"] for c in pod["containers"]}
        name = (
            "tunefleet-vllm"
            if deployment["metadata"]["name"].endswith("inference")
            else "tunefleet"
        )
        assert image == f"ghcr.io/tunefleet/{name}:0.1.0"
    assert manifests.TRAINER_UID == 10001
    assert KubernetesSettings().image == "ghcr.io/tunefleet/tunefleet-trainer:0.1.0"


@pytest.mark.parametrize("image", sorted(CONTENTS))
def test_the_locks_pin_what_the_package_asks_for(image: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, python = CONTENTS[image]
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    environment = {key: str(value) for key, value in default_environment().items()}
    environment.update(python_version=python, sys_platform="linux")
    pins = lock(image)
    for line in wanted:
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{image}.txt pins no {name}: run make image-locks"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{image}.txt pins {name}=={pins[name]}, outside {requirement}: run make image-locks"
        )


def test_the_services_image_has_the_cpu_torch_and_no_cuda() -> None:
    pins = lock("services")
    assert pins["torch"].endswith("+cpu")
    assert not [name for name in pins if name.startswith(("nvidia-", "cuda-", "triton"))]
    assert lock("trainer")["torch"] == pins["torch"].removesuffix("+cpu")
    assert "nvidia-cublas" in lock("trainer") and "vllm" in lock("vllm")


@pytest.mark.images
@pytest.mark.timeout(900)
def test_the_services_image_environment_serves(tmp_path: Path) -> None:
    """What services.Dockerfile does, in a virtual environment: the lock with --no-deps, the
    package, `pip check`, then `tunefleet serve` from it answers a real upload."""
    venv = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
    for step in (
        [*pip, "-r", str(IMAGES / "services.txt")],
        [*pip, "--no-build-isolation", str(ROOT)],
        [str(venv / "bin" / "python"), "-m", "pip", "check"],
    ):
        result = subprocess.run(step, capture_output=True, text=True, check=False, timeout=600)
        assert result.returncode == 0, f"{' '.join(step)}:\n{result.stdout}{result.stderr}"
    sample = Path(demo.__file__).parent / "data" / "orders.jsonl"
    server = LocalServer(tmp_path / "data", executable=venv / "bin" / "tunefleet")
    with server, Client(server.target) as client:
        dataset = client.datasets.upload(sample, display_name="orders")
        assert dataset.record_count > 0
        assert [d.name for d in client.datasets.list()] == [dataset.name]
