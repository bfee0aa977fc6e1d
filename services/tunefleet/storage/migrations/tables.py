"""Every module that declares tables. Alembic's env.py registers them all before comparing or
migrating; a test checks that no `__tablename__` in the code is missing here."""

from __future__ import annotations

import importlib

MODULES = (
    "tunefleet.storage.changes",
    "tunefleet.storage.idempotency",
    "tunefleet.datasets.store",
    "tunefleet.adapters.store",
    "tunefleet.training.store",
    "tunefleet.training.leadership",
    "tunefleet.inference.feedback",
    "tunefleet.evaluation.store",
    "tunefleet.retraining.store",
)


def register_tables() -> None:
    for module in MODULES:
        importlib.import_module(module)
