"""`/v1/files` onto DatasetService and `/v1/fine_tuning/jobs` onto TrainingService.

A file is a dataset and its id is the dataset's id; a fine-tuning job is a training job, its id
the job's. `fine_tuned_model` is the model id the inference half serves (`orders:3`). Options
OpenAI's API has no words for (QLoRA, DoRA, full fine-tuning, LoRA rank, any hyperparameter) go
in the body's `tunefleet` object, a part of tunefleet's TrainingJob in its JSON form, e.g.
`extra_body={"tunefleet": {"method": "TRAINING_METHOD_QLORA", "lora": {"rank": 8}}}`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf import json_format
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tunefleet.client import AsyncClient
from tunefleet.client.inference import openai_message, openai_tool
from tunefleet.openai_front.errors import OpenAIError, bad_request
from tunefleet.openai_front.models import version_id
from tunefleet.v1 import common_pb2, dataset_pb2, training_job_pb2

STATUS = {
    training_job_pb2.TrainingJob.STATE_VALIDATING: "validating_files",
    training_job_pb2.TrainingJob.STATE_QUEUED: "queued",
    training_job_pb2.TrainingJob.STATE_RUNNING: "running",
    training_job_pb2.TrainingJob.STATE_CANCELLING: "running",  # until its worker has stopped
    training_job_pb2.TrainingJob.STATE_SUCCEEDED: "succeeded",
    training_job_pb2.TrainingJob.STATE_FAILED: "failed",
    training_job_pb2.TrainingJob.STATE_CANCELLED: "cancelled",
}
# The requested learning_rate_multiplier, kept with the job to report it back.
MULTIPLIER_LABEL = "openai-learning-rate-multiplier"
# Request ids are UUIDs: an Idempotency-Key (openai-python sends one per request, the same on its
# retries) names one through this namespace.
REQUEST_IDS = uuid.UUID("0d3c6b9e-4a51-4c1e-9f51-2b8f0d7a1c42")


def _request_id(request: Request) -> str:
    key = request.headers.get("idempotency-key", "")
    return str(uuid.uuid5(REQUEST_IDS, key)) if key else str(uuid.uuid4())


def _id(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _page(request: Request, items: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's cursor pagination over `items` (already in the order listed): those after the
    `after` id, `limit` of them (default 20)."""
    try:
        limit = int(request.query_params.get("limit", 20))
    except ValueError:
        raise bad_request("limit", "must be an integer") from None
    if not 1 <= limit <= 10000:
        raise bad_request("limit", "must be 1 to 10000")
    after = request.query_params.get("after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad_request("after", f"{after!r} is not in this list")
        items = items[ids.index(after) + 1 :]
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "has_more": len(items) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


# --- files --------------------------------------------------------------------------------------


def _file(dataset: dataset_pb2.Dataset) -> dict[str, Any]:
    report = dataset.validation_report
    details = None
    if report.rejected_records:
        counts = ", ".join(f"{c.code}: {c.count}" for c in report.counts)
        details = (
            f"{report.rejected_records} of {report.total_records} records rejected ({counts}); "
            f"{dataset.record_count} kept after cleaning"
        )
    return {
        "id": _id(dataset.name),
        "object": "file",
        "bytes": dataset.source_size_bytes,
        "created_at": dataset.create_time.seconds,
        "filename": dataset.display_name,
        "purpose": "fine-tune",
        "status": "processed" if dataset.state == dataset_pb2.Dataset.STATE_READY else "uploaded",
        "status_details": details,
        "expires_at": None,
    }


async def create_file(request: Request, client: AsyncClient) -> Response:
    """Multipart `file` and `purpose=fine-tune`: the file is uploaded to DatasetService, which
    validates, cleans and splits it before answering. A file it refuses is a 400 naming why;
    one with some rejected records is `processed`, with the count in `status_details`."""
    async with request.form() as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "fine-tune":
            raise bad_request("purpose", "only 'fine-tune' files are accepted (datasets)")
        if not isinstance(upload, UploadFile):
            raise bad_request("file", "a multipart file field is required")
        dataset = await client.datasets.upload(
            upload.file, display_name=upload.filename or "", request_id=_request_id(request)
        )
    return JSONResponse(_file(dataset))


async def list_files(request: Request, client: AsyncClient) -> Response:
    purpose = request.query_params.get("purpose")
    files = (
        []
        if purpose not in (None, "fine-tune")
        else [_file(dataset) async for dataset in client.datasets.list()]
    )
    if request.query_params.get("order") == "asc":
        files.reverse()
    return JSONResponse(_page(request, files))


async def get_file(request: Request, client: AsyncClient) -> Response:
    return JSONResponse(_file(await client.datasets.get(request.path_params["file_id"])))


async def delete_file(request: Request, client: AsyncClient) -> Response:
    file_id = request.path_params["file_id"]
    await client.datasets.delete(file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


def _line(record: dataset_pb2.DatasetRecord) -> str:
    """A cleaned record in OpenAI's fine-tuning form: chat `messages` (with `tools`), or a
    preference pair's `input` with `preferred_output` and `non_preferred_output`."""
    if record.chosen:
        document: dict[str, Any] = {
            "input": {"messages": [openai_message(m) for m in record.messages]},
            "preferred_output": [openai_message(m) for m in record.chosen],
            "non_preferred_output": [openai_message(m) for m in record.rejected],
        }
    else:
        document = {"messages": [openai_message(m) for m in record.messages]}
    if record.tools:
        document["tools"] = [openai_tool(tool) for tool in record.tools]
    return json.dumps(document, ensure_ascii=False) + "\n"


async def file_content(request: Request, client: AsyncClient) -> Response:
    """The dataset's cleaned records (PII redacted, duplicates removed), as JSON lines."""
    dataset = await client.datasets.get(request.path_params["file_id"])
    page = 1000

    async def lines() -> AsyncIterator[str]:
        offset = 0
        while True:
            count = 0
            async for record in client.datasets.preview(dataset.name, offset=offset, limit=page):
                count += 1
                yield _line(record)
            if count < page:
                return
            offset += page

    return StreamingResponse(lines(), media_type="application/jsonl")


# --- fine-tuning jobs ---------------------------------------------------------------------------


def _job(job: training_job_pb2.TrainingJob) -> dict[str, Any]:
    hp = job.hyperparameters
    labels = dict(job.labels)
    multiplier = labels.pop(MULTIPLIER_LABEL, "auto")
    error = None
    if job.state == training_job_pb2.TrainingJob.STATE_FAILED:
        error = {"code": job.error.reason, "message": job.error.message, "param": None}
    method = "dpo" if job.objective == training_job_pb2.TRAINING_OBJECTIVE_DPO else "supervised"
    hyperparameters: dict[str, Any] = {
        "n_epochs": hp.epochs if hp.HasField("epochs") else "auto",
        "batch_size": (hp.micro_batch_size or 4) * (hp.gradient_accumulation_steps or 1),
        "learning_rate_multiplier": float(multiplier) if multiplier != "auto" else "auto",
    }
    if method == "dpo":
        hyperparameters["beta"] = job.dpo.beta
    return {
        "id": _id(job.name),
        "object": "fine_tuning.job",
        "created_at": job.create_time.seconds,
        "finished_at": job.end_time.seconds if job.HasField("end_time") else None,
        "model": job.base_model,
        "fine_tuned_model": version_id(job.output_adapter_version)
        if job.output_adapter_version
        else None,
        "organization_id": "tunefleet",
        "status": STATUS.get(job.state, "queued"),
        "hyperparameters": hyperparameters,
        "method": {"type": method, method: {"hyperparameters": hyperparameters}},
        "training_file": _id(job.train_dataset),
        "validation_file": _id(job.validation_dataset) if job.validation_dataset else None,
        "result_files": [],
        "trained_tokens": None,
        "error": error,
        "seed": hp.seed if hp.HasField("seed") else None,
        "estimated_finish": None,
        "integrations": [],
        "metadata": labels or None,
        "user_provided_suffix": _id(job.adapter),
        "tunefleet": json_format.MessageToDict(job),
    }


def _auto(value: Any, param: str, kind: Callable[[Any], Any]) -> Any:
    """An OpenAI hyperparameter: "auto" (None: tunefleet's default) or a number."""
    if value is None or value == "auto":
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise bad_request(param, f"{value!r} is neither 'auto' nor a number") from None
    if number <= 0:
        raise bad_request(param, "must be positive")
    return number


def _object(parent: dict[str, Any], key: str, param: str) -> dict[str, Any]:
    """`parent[key]`, a JSON object ({} when absent), or 400 naming `param`."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(param, "must be an object")
    return value


def _training_job(body: dict[str, Any]) -> tuple[training_job_pb2.TrainingJob, float | None]:
    """The TrainingJob a create request describes, and its learning_rate_multiplier."""
    for param in ("model", "training_file"):
        if not isinstance(body.get(param), str) or not body[param]:
            raise bad_request(param, "required", "missing_required_parameter")
    if body.get("integrations"):
        raise bad_request("integrations", "are not supported", "unsupported_parameter")
    method = _object(body, "method", "method") or {"type": "supervised"}
    kind = method.get("type", "supervised")
    if kind not in ("supervised", "dpo"):
        raise bad_request("method.type", "must be 'supervised' or 'dpo'")
    hp = _object(body, "hyperparameters", "hyperparameters")
    details = _object(method, kind, f"method.{kind}")
    hp.update(_object(details, "hyperparameters", f"method.{kind}.hyperparameters"))
    suffix = body.get("suffix") or f"ft-{uuid.uuid4().hex[:8]}"
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad_request("metadata", "must map strings to strings")
    job = training_job_pb2.TrainingJob(
        base_model=body["model"],
        train_dataset=f"datasets/{_id(body['training_file'])}",
        adapter=f"adapters/{suffix}",
        display_name=suffix,
        labels=metadata,
        method=common_pb2.TRAINING_METHOD_LORA,  # unless `tunefleet` names another
    )
    if body.get("validation_file"):
        job.validation_dataset = f"datasets/{_id(body['validation_file'])}"
    if kind == "dpo":
        job.objective = training_job_pb2.TRAINING_OBJECTIVE_DPO
        if (beta := _auto(hp.get("beta"), "method.dpo.hyperparameters.beta", float)) is not None:
            job.dpo.beta = beta
    if (epochs := _auto(hp.get("n_epochs"), "hyperparameters.n_epochs", int)) is not None:
        job.hyperparameters.epochs = epochs
    if (batch := _auto(hp.get("batch_size"), "hyperparameters.batch_size", int)) is not None:
        job.hyperparameters.micro_batch_size = batch
    if body.get("seed") is not None:
        if type(body["seed"]) is not int or not -(2**63) <= body["seed"] < 2**63:
            raise bad_request("seed", "must be a 64-bit integer")
        job.hyperparameters.seed = body["seed"]
    own = body.get("tunefleet") or {}
    if not isinstance(own, dict):
        raise bad_request("tunefleet", "must be a TrainingJob in its JSON form")
    try:
        json_format.ParseDict(own, job)
    except json_format.ParseError as error:
        raise bad_request("tunefleet", str(error)) from None
    multiplier = _auto(
        hp.get("learning_rate_multiplier"), "hyperparameters.learning_rate_multiplier", float
    )
    if multiplier is not None:
        job.labels[MULTIPLIER_LABEL] = repr(multiplier)
    return job, multiplier


async def create_job(request: Request, client: AsyncClient, body: Any) -> Response:
    """The learning_rate_multiplier scales the learning rate TrainingService would choose for
    the method, which a validate-only create reports first."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_json")
    job, multiplier = _training_job(body)
    if multiplier is not None and not job.hyperparameters.HasField("learning_rate"):
        checked = await client.training_jobs.create(job, validate_only=True)
        job.hyperparameters.learning_rate = checked.hyperparameters.learning_rate * multiplier
    created = await client.training_jobs.create(job, request_id=_request_id(request))
    return JSONResponse(_job(created))


async def list_jobs(request: Request, client: AsyncClient) -> Response:
    jobs = [_job(job) async for job in client.training_jobs.list()]
    return JSONResponse(_page(request, jobs))


async def get_job(request: Request, client: AsyncClient) -> Response:
    return JSONResponse(_job(await client.training_jobs.get(request.path_params["job_id"])))


async def cancel_job(request: Request, client: AsyncClient) -> Response:
    return JSONResponse(_job(await client.training_jobs.cancel(request.path_params["job_id"])))


def _event(job_id: str, event: training_job_pb2.TrainingEvent) -> dict[str, Any]:
    which = event.WhichOneof("event")
    level, kind, data = "info", "message", None
    if which == "state_change":
        change = event.state_change
        message = f"Job entered {STATUS.get(change.state, 'queued')}"
        if change.reason or change.message:
            message += f": {change.reason} {change.message}".rstrip()
    elif which == "progress":
        kind = "metrics"
        data = json_format.MessageToDict(event.progress, preserving_proto_field_name=True)
        data.pop("time", None)
        message = f"Step {event.progress.step}/{event.progress.total_steps}"
        if event.progress.HasField("train_loss"):
            message += f": training loss={event.progress.train_loss:.4f}"
    elif which == "checkpoint":
        message = f"Checkpoint saved at step {event.checkpoint.step}"
    elif which == "log":
        message = event.log.text
        level = "warn" if event.log.stream == "stderr" else "info"
    elif which == "evaluation":
        kind = "metrics"
        data = json_format.MessageToDict(event.evaluation, preserving_proto_field_name=True)
        message = f"Evaluation: validation loss {event.evaluation.validation_loss:.4f}"
    else:
        level, message = "error", f"{event.error.reason}: {event.error.message}"
    return {
        "id": f"{job_id}-{event.sequence}",
        "object": "fine_tuning.job.event",
        "created_at": event.time.seconds,
        "level": level,
        "message": message,
        "type": kind,
        "data": data,
    }


async def job_events(request: Request, client: AsyncClient) -> Response:
    """The job's events so far, newest first, as OpenAI lists them."""
    job_id = _id(request.path_params["job_id"])
    events = [_event(job_id, e) async for e in client.training_jobs.events(job_id, follow=False)]
    events.reverse()
    return JSONResponse(_page(request, events))


async def job_checkpoints(request: Request, client: AsyncClient) -> Response:
    """The job's checkpoints, newest first. `fine_tuned_model_checkpoint` is the checkpoint's
    name: checkpoints are resumable training state, not served models."""
    job_id = _id(request.path_params["job_id"])
    checkpoints = [
        {
            "id": _id(checkpoint.name),
            "object": "fine_tuning.job.checkpoint",
            "created_at": checkpoint.create_time.seconds,
            "fine_tuned_model_checkpoint": checkpoint.name,
            "fine_tuning_job_id": job_id,
            "step_number": checkpoint.step,
            "metrics": {"step": checkpoint.step}
            | (
                {"valid_loss": checkpoint.validation_loss}
                if checkpoint.HasField("validation_loss")
                else {}
            ),
        }
        async for checkpoint in client.training_jobs.checkpoints(job_id)
    ]
    checkpoints.reverse()
    return JSONResponse(_page(request, checkpoints))


async def unsupported(request: Request, client: AsyncClient) -> Response:
    """Pause and resume: tunefleet's jobs are cancelled and started again instead."""
    action = request.url.path.rsplit("/", 1)[-1]
    error = OpenAIError(
        501,
        f"{action} is not supported by tunefleet: cancel the job and create another (its "
        "checkpoints are kept)",
        type="invalid_request_error",
        code="unsupported_endpoint",
    )
    return error.response(headers={"x-should-retry": "false"})
