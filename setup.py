"""Maps the three source roots onto the one `tunefleet` namespace package.

    gen/python/tunefleet/v1  generated protobuf and gRPC code, never edited by hand
    services/tunefleet/...   the services, and the runtime and storage they share
    clients/tunefleet/...    the SDK and the CLI

Everything else about the distribution is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOTS = ("gen/python", "services", "clients")

packages: list[str] = []
package_dir: dict[str, str] = {}
for root in ROOTS:
    for package in find_namespace_packages(
        root, include=["tunefleet.*"], exclude=["*.__pycache__"]
    ):
        packages.append(package)
        package_dir[package] = str(Path(root, *package.split(".")))

setup(packages=packages, package_dir=package_dir)
