"""TrainingService in the SDK: start, follow, wait for and cancel fine-tuning jobs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from tunefleet.client.core import (
    Call,
    Feed,
    M,
    Program,
    Resource,
    each,
    operation,
    pages,
    stream,
    watching,
)
from tunefleet.client.helpers import resource_name, to_message
from tunefleet.v1 import training_job_pb2, training_service_pb2, training_service_pb2_grpc


class TrainingJobs(Resource[M]):
    """TrainingService: start, follow and cancel fine-tuning jobs."""

    Stub = training_service_pb2_grpc.TrainingServiceStub

    @operation
    def create(
        self,
        job: training_job_pb2.TrainingJob | Mapping[str, Any],
        *,
        request_id: str = "",
        validate_only: bool = False,
    ) -> Program[training_job_pb2.TrainingJob]:
        """Start a fine-tuning job, given as a `TrainingJob` or its JSON form. A request id is
        generated when none is given, so the call is retried safely if the server is briefly
        unreachable. `validate_only` checks the job (and its GPU memory estimate) only.

        Example::

            job = client.training_jobs.create({
                "baseModel": "smollm2-135m-instruct", "method": "TRAINING_METHOD_LORA",
                "trainDataset": dataset.name, "adapter": "adapters/orders",
                "hyperparameters": {"epochs": 2, "learningRate": 1e-3},
            })
        """
        request = training_service_pb2.CreateTrainingJobRequest(
            training_job=to_message(training_job_pb2.TrainingJob, job, "training_job"),
            request_id=request_id or str(uuid.uuid4()),
            validate_only=validate_only,
        )
        created: training_job_pb2.TrainingJob = yield Call(
            self.Stub, "CreateTrainingJob", request, idempotent=True
        )
        return created

    @operation
    def get(self, name: str) -> Program[training_job_pb2.TrainingJob]:
        """A job by name (`trainingJobs/{id}` or the id), with its state and latest progress.

        Example::

            job = client.training_jobs.get("trainingJobs/7d1e...")
            print(job.state, job.latest_progress.train_loss)
        """
        request = training_service_pb2.GetTrainingJobRequest(
            name=resource_name("trainingJobs", name)
        )
        job: training_job_pb2.TrainingJob = yield Call(
            self.Stub, "GetTrainingJob", request, idempotent=True
        )
        return job

    @stream
    def list(
        self,
        filter: str = "",
        page_size: int = 100,
    ) -> Feed[training_job_pb2.TrainingJob]:
        """Every job matching `filter` (such as `state=RUNNING`), newest first.

        Example::

            for job in client.training_jobs.list(filter="state=RUNNING"):
                print(job.name, job.latest_progress.step)
        """
        request = training_service_pb2.ListTrainingJobsRequest(page_size=page_size, filter=filter)
        yield from pages(self.Stub, "ListTrainingJobs", request, "training_jobs")

    @operation
    def cancel(self, name: str) -> Program[training_job_pb2.TrainingJob]:
        """Ask a job to stop; it ends CANCELLED once its worker has stopped.

        Example::

            client.training_jobs.cancel("trainingJobs/7d1e...")
        """
        request = training_service_pb2.CancelTrainingJobRequest(
            name=resource_name("trainingJobs", name)
        )
        job: training_job_pb2.TrainingJob = yield Call(
            self.Stub, "CancelTrainingJob", request, idempotent=True
        )
        return job

    @stream
    def events(
        self,
        name: str,
        *,
        after_sequence: int = 0,
        follow: bool = True,
        timeout: float | None = None,
    ) -> Feed[training_job_pb2.TrainingEvent]:
        """The job's events (state changes, progress, checkpoints, log lines, evaluation) after
        `after_sequence`; with `follow`, new ones as they happen until the job ends. A dropped
        connection is resumed after the last event seen, so none is lost or repeated.
        `timeout` bounds the whole iteration (DeadlineExceeded).

        Example::

            for event in client.training_jobs.events(job.name):
                if event.HasField("progress"):
                    print(event.progress.step, event.progress.train_loss)
        """
        request = training_service_pb2.StreamTrainingJobEventsRequest(
            name=resource_name("trainingJobs", name),
            after_sequence=after_sequence,
            no_follow=not follow,
        )

        def resume_after(event: training_job_pb2.TrainingEvent) -> None:
            request.after_sequence = event.sequence

        yield from watching(
            self.Stub, "StreamTrainingJobEvents", request, timeout, seen=resume_after
        )

    @operation
    def wait(
        self,
        name: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[training_job_pb2.TrainingEvent], None] | None = None,
    ) -> Program[training_job_pb2.TrainingJob]:
        """Block until the job has ended (SUCCEEDED, FAILED or CANCELLED) and return it;
        `on_event` sees every event on the way. Raises DeadlineExceeded after `timeout`.

        Example::

            job = client.training_jobs.wait(job.name, on_event=print)
            print(job.output_adapter_version)
        """
        events = TrainingJobs.events.function(self, name, timeout=timeout)
        yield from each(events, on_event or (lambda event: None))
        job: training_job_pb2.TrainingJob = yield from TrainingJobs.get.function(self, name)
        return job

    @stream
    def checkpoints(self, name: str, page_size: int = 100) -> Feed[training_job_pb2.Checkpoint]:
        """The job's saved checkpoints, oldest first.

        Example::

            for checkpoint in client.training_jobs.checkpoints(job.name):
                print(checkpoint.step, checkpoint.uri)
        """
        request = training_service_pb2.ListCheckpointsRequest(
            parent=resource_name("trainingJobs", name), page_size=page_size
        )
        yield from pages(self.Stub, "ListCheckpoints", request, "checkpoints")
