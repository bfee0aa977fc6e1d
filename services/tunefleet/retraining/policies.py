"""A retraining policy's checks, and the parts of a run it shapes: the training recipe (the
champion's with the policy's overrides) and the comparison of challenger and champion."""

from __future__ import annotations

import re
from typing import Any

from tunefleet.client import AsyncClient
from tunefleet.client import TunefleetError as ClientError
from tunefleet.core import names
from tunefleet.core.errors import InvalidArgument, relayed
from tunefleet.v1 import evaluation_pb2, retraining_pb2, training_job_pb2

Policy = retraining_pb2.RetrainingPolicy
FIELD = "retraining_policy"
ALIAS = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
# The training job's settings a policy's recipe may set; the rest is the run's own.
RECIPE_FIELDS = ["method", "objective", "dpo", "lora", "hyperparameters", "resources", "priority"]


async def check_policy(policy: Policy, api: AsyncClient) -> None:
    """Defaults filled in, then every check, with the other services where they decide
    (the adapter exists, the evaluation is one EvaluationService accepts)."""
    names.adapter_id(policy.adapter, f"{FIELD}.adapter")
    policy.champion_alias = policy.champion_alias or "prod"
    policy.challenger_alias = policy.challenger_alias or "candidate"
    for field in ("champion_alias", "challenger_alias"):
        if not ALIAS.fullmatch(getattr(policy, field)):
            raise InvalidArgument(f"{FIELD}.{field}", "must be 1 to 63 of [a-z0-9-]")
    if policy.champion_alias == policy.challenger_alias:
        raise InvalidArgument(f"{FIELD}.challenger_alias", "must differ from champion_alias")
    data = policy.data
    data.min_new_examples = data.min_new_examples or 10
    if data.min_new_examples < 0:
        raise InvalidArgument(f"{FIELD}.data.min_new_examples", "must not be negative")
    if not 0 <= data.positive_fraction <= 1:
        raise InvalidArgument(f"{FIELD}.data.positive_fraction", "must be 0 to 1")
    if not data.HasField("include_champion_data"):
        data.include_champion_data = True
    canary = policy.canary
    if not 0 <= canary.percent <= 99:
        raise InvalidArgument(f"{FIELD}.canary.percent", "must be 0 to 99")
    canary.min_ratings = canary.min_ratings or 20
    if canary.min_ratings < 0:
        raise InvalidArgument(f"{FIELD}.canary.min_ratings", "must not be negative")
    canary.max_negative_increase = canary.max_negative_increase or 0.1
    if not 0 < canary.max_negative_increase <= 1:
        raise InvalidArgument(f"{FIELD}.canary.max_negative_increase", "must be in (0, 1]")
    if policy.triggers.schedule_seconds < 0:
        raise InvalidArgument(f"{FIELD}.triggers.schedule_seconds", "must not be negative")
    if policy.promotion == Policy.PROMOTION_UNSPECIFIED:
        policy.promotion = Policy.PROMOTION_MANUAL
    recipe = training_job_pb2.TrainingJob()
    override(policy.recipe, recipe)  # the rest of a recipe is the run's own: ignored
    policy.recipe.CopyFrom(recipe)
    if not policy.HasField("evaluation"):
        raise InvalidArgument(f"{FIELD}.evaluation", "is required: the frozen comparison")
    if not policy.evaluation.gate.metric:
        raise InvalidArgument(
            f"{FIELD}.evaluation.gate.metric", "is required: what the challenger must improve"
        )
    try:
        await api.adapters.get(policy.adapter)
    except ClientError as error:
        if error.code.name == "NOT_FOUND":
            raise InvalidArgument(f"{FIELD}.adapter", f"{policy.adapter} not found") from None
        raise relayed(error, "AdapterService") from None
    await _check_evaluation(policy, "evaluation", api)
    if policy.HasField("regression"):
        await _check_evaluation(policy, "regression", api)


async def _check_evaluation(policy: Policy, field: str, api: AsyncClient) -> None:
    """EvaluationService's own checks of the comparison (validate_only), with the champion
    on both sides; its field names are answered under the policy's."""
    template: evaluation_pb2.EvaluationJob = getattr(policy, field)
    for output in ("candidates", "baseline", "results"):
        template.ClearField(output)
    try:
        await api.evaluations.create(
            comparison(template, f"{policy.adapter}@{policy.champion_alias}", ""),
            validate_only=True,
        )
    except ClientError as error:
        refused = relayed(error, "EvaluationService")
        if isinstance(refused, InvalidArgument):
            where = refused.field.replace("evaluation_job", f"{FIELD}.{field}", 1)
            raise InvalidArgument(where, refused.description) from None
        raise refused from None


_MESSAGES = {"dpo", "lora", "hyperparameters", "resources"}


def copy_field(source: Any, target: Any, field: str) -> None:
    if field in _MESSAGES:
        getattr(target, field).CopyFrom(getattr(source, field))
    else:
        setattr(target, field, getattr(source, field))


def override(recipe: training_job_pb2.TrainingJob, job: training_job_pb2.TrainingJob) -> None:
    """The recipe fields that `recipe` sets, copied onto `job`."""
    for field in RECIPE_FIELDS:
        if recipe.HasField(field) if field in _MESSAGES else getattr(recipe, field):  # type: ignore[arg-type]
            copy_field(recipe, job, field)


def comparison(
    template: evaluation_pb2.EvaluationJob, champion: str, challenger: str, gated: bool = True
) -> evaluation_pb2.EvaluationJob:
    """The policy's evaluation with the champion as the baseline and the challenger beside it."""
    job = evaluation_pb2.EvaluationJob()
    job.CopyFrom(template)
    job.ClearField("candidates")
    job.candidates.add(name="champion", adapter=champion)
    job.candidates.add(name="challenger", adapter=challenger or champion)
    job.baseline = "champion"
    if not gated:
        job.ClearField("gate")
    return job
