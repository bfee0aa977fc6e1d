"""TrainingService's clients of the services it calls, over their public APIs.

DatasetService: the datasets a job names, and the leases that keep them from being deleted while
the job uses them. AdapterService: the adapter a job trains is created (or checked) when the job
is, and at the end of a run whose final report never arrived, a version the worker left behind is
checked (it exists and was trained by the job), or the output it stored but could not register
is registered (the same request, with the same request id, so a registration that did happen is
not repeated). EvaluationService: the evaluation of a registered version, when the service
evaluates after training."""

from __future__ import annotations

import logging
import uuid

import grpc

from tunefleet.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    TunefleetError,
    Unavailable,
)
from tunefleet.runtime.peers import DatasetServicePeer, Peer
from tunefleet.runtime.settings import AfterTrainingSettings
from tunefleet.storage.blobs import BlobStore, uri_sha256
from tunefleet.v1 import (
    adapter_pb2,
    adapter_service_pb2,
    adapter_service_pb2_grpc,
    dataset_pb2,
    dataset_service_pb2,
    evaluation_pb2,
    evaluation_service_pb2,
    evaluation_service_pb2_grpc,
    inference_pb2,
    training_job_pb2,
)

TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CALL_SECONDS = 300.0
log = logging.getLogger(__name__)


class RegistryUnavailable(Exception):
    """AdapterService cannot answer now; try again later."""


class RegistrationRefused(Exception):
    """AdapterService refused the output, or the output is not there: final."""


class AdapterServiceClient(Peer):
    stub_class = adapter_service_pb2_grpc.AdapterServiceStub
    service = "AdapterService"

    def __init__(self, endpoint: str, token: str, blobs: BlobStore) -> None:
        super().__init__(endpoint, token)
        self.blobs = blobs

    async def check_adapter(self, name: str, base_model: str) -> bool:
        """Whether adapter `name` exists; FAILED_PRECONDITION when it is for another base model."""
        try:
            request = adapter_service_pb2.GetAdapterRequest(name=name)
            adapter = await self.call("GetAdapter", request)
        except NotFound:
            return False
        if adapter.base_model != base_model:
            raise FailedPrecondition(
                f"training_job.adapter: {name} is for base model {adapter.base_model!r}, "
                f"not {base_model!r}",
                reason="ADAPTER_BASE_MODEL_MISMATCH",
            )
        return True

    async def ensure_adapter(self, name: str, base_model: str, description: str) -> None:
        """Create adapter `name` for `base_model` unless it exists (for that base model)."""
        if await self.check_adapter(name, base_model):
            return
        try:
            await self.call(
                "CreateAdapter",
                adapter_service_pb2.CreateAdapterRequest(
                    adapter_id=name.removeprefix("adapters/"),
                    adapter=adapter_pb2.Adapter(base_model=base_model, description=description),
                ),
            )
        except AlreadyExists:  # another job created it meanwhile
            await self.check_adapter(name, base_model)

    async def trained_by(self, version: str, job: str) -> bool:
        """Whether `version` exists and its lineage names `job`."""
        try:
            found = await self.stub.GetAdapterVersion(
                adapter_service_pb2.GetAdapterVersionRequest(name=version),
                timeout=30,
                metadata=self.metadata,
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in TRANSIENT:
                raise RegistryUnavailable(f"{error.code().name}: {error.details()}") from None
            return False
        return bool(found.lineage.training_job == job)

    async def register(self, request_uri: str, job: str) -> str:
        """Send the stored CreateAdapterVersionRequest at `request_uri`; the version's name."""
        sha256 = uri_sha256(request_uri)
        try:
            if sha256 is None:
                raise ValueError(f"{request_uri!r} does not name a blob")
            request = adapter_service_pb2.CreateAdapterVersionRequest.FromString(
                self.blobs.read_bytes(sha256)
            )
        except Exception as error:
            raise RegistrationRefused(
                f"the stored registration request {request_uri} cannot be read ({error})"
            ) from None
        if request.lineage.training_job != job:
            raise RegistrationRefused(
                f"the stored registration request {request_uri} is not {job}'s"
            )
        try:
            version = await self.stub.CreateAdapterVersion(
                request, timeout=CALL_SECONDS, metadata=self.metadata, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as error:
            said = f"{error.code().name}: {error.details()}"
            if error.code() in TRANSIENT:
                raise RegistryUnavailable(said) from None
            raise RegistrationRefused(f"the registry refused the result ({said})") from None
        return str(version.name)


def lease_id(job_id: str) -> str:
    """The id of the leases a job holds on its datasets."""
    return f"job-{job_id}"


class DatasetServiceClient(DatasetServicePeer):
    """The datasets a job names (`dataset`) and their leases."""

    async def lease(self, dataset: str, job_id: str, holder: str) -> None:
        """Lease `dataset` for the job (a retry returns the lease that exists)."""
        await self.call(
            "CreateDatasetLease",
            dataset_service_pb2.CreateDatasetLeaseRequest(
                parent=dataset,
                lease_id=lease_id(job_id),
                lease=dataset_pb2.DatasetLease(holder=holder),
            ),
        )

    async def release(self, dataset: str, job_id: str) -> None:
        """Delete the job's lease on `dataset`; one that is gone already is fine."""
        await self.call(
            "DeleteDatasetLease",
            dataset_service_pb2.DeleteDatasetLeaseRequest(
                name=f"{dataset}/leases/{lease_id(job_id)}", allow_missing=True
            ),
        )


class EvaluationServiceClient(Peer):
    """The evaluation of each version a job registers (`training.evaluation`)."""

    stub_class = evaluation_service_pb2_grpc.EvaluationServiceStub
    service = "EvaluationService"

    def __init__(self, settings: AfterTrainingSettings, token: str) -> None:
        super().__init__(settings.endpoint, token)
        self.settings = settings

    async def evaluate(self, job_id: str, job: training_job_pb2.TrainingJob) -> list[str]:
        """Create the evaluations of `job`'s version against the base model: on its validation
        data (with the gate), then on the regression dataset when one is set; their names.
        Idempotent: a retry returns the jobs created before."""
        settings = self.settings
        candidates = [
            evaluation_pb2.EvaluationCandidate(name="base"),
            evaluation_pb2.EvaluationCandidate(name="adapter", adapter=job.output_adapter_version),
        ]
        label = job.display_name or job.name
        task = evaluation_pb2.EvaluationJob(
            display_name=f"{label} after training"[:200],
            candidates=candidates,
            baseline="base",
            dataset=job.validation_dataset or job.train_dataset,
            split=(
                dataset_pb2.DATASET_SPLIT_TRAIN
                if job.validation_dataset
                else dataset_pb2.DATASET_SPLIT_VALIDATION
            ),
            max_items=settings.max_items,
            sampling=inference_pb2.SamplingParams(max_tokens=settings.max_tokens),
            graders=[evaluation_pb2.EvaluationGrader(type=name) for name in settings.graders],
            gate=evaluation_pb2.EvaluationGate(
                metric=settings.gate_metric, min_improvement=settings.min_improvement
            ),
        )
        names = [await self._create(task, f"{job_id}:task")]
        if settings.regression_dataset:
            regression = evaluation_pb2.EvaluationJob(
                display_name=f"{label}: general skills after training"[:200],
                candidates=candidates,
                baseline="base",
                dataset=settings.regression_dataset,
                split=dataset_pb2.DATASET_SPLIT_TRAIN,
                sampling=inference_pb2.SamplingParams(max_tokens=settings.regression_max_tokens),
                graders=[
                    evaluation_pb2.EvaluationGrader(
                        name="general", type="string_check", operation="like", normalise=True
                    ),
                    evaluation_pb2.EvaluationGrader(type="kl_from_base"),
                ],
            )
            try:
                names.append(await self._create(regression, f"{job_id}:regression"))
            except Unavailable:
                raise
            except TunefleetError as error:  # the task's evaluation stands without it
                log.warning("EvaluationService refused the regression pass of %s: %s", label, error)
        return names

    async def _create(self, evaluation: evaluation_pb2.EvaluationJob, key: str) -> str:
        request_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"tunefleet:after-training:{key}"))
        created = await self.call(
            "CreateEvaluationJob",
            evaluation_service_pb2.CreateEvaluationJobRequest(
                evaluation_job=evaluation, request_id=request_id
            ),
        )
        return str(created.name)
