"""`tunefleet jobs ...`"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tunefleet.cli.output import (
    calls,
    client,
    console,
    counting_progress,
    enum_name,
    fields,
    handles_errors,
    listing,
    output_option,
    print_json,
    print_json_line,
    size,
    when,
)
from tunefleet.client import Client
from tunefleet.v1 import common_pb2, training_job_pb2

TrainingJob = training_job_pb2.TrainingJob
METHODS = ["lora", "qlora", "dora", "full"]


def state(value: int) -> str:
    return enum_name(TrainingJob.State, value, "STATE_")


@click.group()
def jobs() -> None:
    """Start, follow and cancel fine-tuning jobs."""


@jobs.command()
@click.option("--base-model", help="A model the platform knows (settings `models`).")
@click.option("--dataset", "train_dataset", help="The training dataset, datasets/{id}.")
@click.option("--validation-dataset", default="", help="Default: the dataset's validation split.")
@click.option("--adapter", help="adapters/{id}: the adapter the result is registered under.")
@click.option("--method", type=click.Choice(METHODS), default="lora", show_default=True)
@click.option(
    "--objective",
    type=click.Choice(["sft", "dpo"]),
    help="sft (the default) trains on conversations; dpo on a preference dataset's pairs.",
)
@click.option("--dpo-beta", type=float, help="DPO's beta (default 0.1).")
@click.option("--rank", type=int, help="LoRA rank.")
@click.option("--epochs", type=float)
@click.option("--max-steps", type=int)
@click.option("--learning-rate", type=float)
@click.option("--micro-batch-size", type=int)
@click.option("--max-sequence-length", type=int)
@click.option("--eval-every-steps", type=int)
@click.option("--gpus", type=int, help="GPUs per job, of each node (Kubernetes launcher).")
@click.option("--nodes", type=int, help="Nodes the job spans (Kubernetes launcher).")
@click.option("--fsdp", is_flag=True, help="Shard the model across the job's GPUs (FSDP).")
@click.option("--priority", type=int, default=0)
@click.option("--name", "display_name", default="")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A TrainingJob in JSON; the other options override its fields.",
)
@click.option("--validate-only", is_flag=True, help="Check the job and its memory estimate only.")
@click.option("--follow", "-f", is_flag=True, help="Then follow its progress (like jobs logs -f).")
@output_option
@handles_errors
@calls("TrainingService.CreateTrainingJob")
def create(
    base_model: str | None,
    train_dataset: str | None,
    validation_dataset: str,
    adapter: str | None,
    method: str,
    objective: str | None,
    dpo_beta: float | None,
    rank: int | None,
    epochs: float | None,
    max_steps: int | None,
    learning_rate: float | None,
    micro_batch_size: int | None,
    max_sequence_length: int | None,
    eval_every_steps: int | None,
    gpus: int | None,
    nodes: int | None,
    fsdp: bool,
    priority: int,
    display_name: str,
    from_file: Path | None,
    validate_only: bool,
    follow: bool,
    output: str,
) -> None:
    """Start a fine-tuning job."""
    job: dict[str, Any] = {}
    if from_file:
        try:
            job = json.loads(from_file.read_text())
        except ValueError as error:
            raise click.BadParameter(f"not JSON: {error}", param_hint="--from-file") from None
        if not isinstance(job, dict):
            raise click.BadParameter(
                "expected a JSON object (a TrainingJob)", param_hint="--from-file"
            )
    given = {
        "baseModel": base_model,
        "trainDataset": train_dataset,
        "validationDataset": validation_dataset or None,
        "adapter": adapter,
        "displayName": display_name or None,
        "priority": priority or None,
    }
    job.update({key: value for key, value in given.items() if value is not None})
    if "method" not in job or method != "lora":
        job["method"] = f"TRAINING_METHOD_{method.upper()}"
    if objective is not None:
        job["objective"] = f"TRAINING_OBJECTIVE_{objective.upper()}"
    if dpo_beta is not None:
        job.setdefault("dpo", {})["beta"] = dpo_beta
    if rank is not None:
        job.setdefault("lora", {})["rank"] = rank
    hyperparameters = {
        "epochs": epochs,
        "maxSteps": max_steps,
        "learningRate": learning_rate,
        "microBatchSize": micro_batch_size,
        "maxSequenceLength": max_sequence_length,
        "evalEverySteps": eval_every_steps,
    }
    job.setdefault("hyperparameters", {}).update(
        {key: value for key, value in hyperparameters.items() if value is not None}
    )
    if gpus is not None:
        job.setdefault("resources", {})["gpuCount"] = gpus
    if nodes is not None:
        job.setdefault("resources", {})["nodeCount"] = nodes
    if fsdp:
        job.setdefault("resources", {})["fsdp"] = True
    with client() as tunefleet:
        created = tunefleet.training_jobs.create(job, validate_only=validate_only)
        if output == "json" and not follow:
            print_json(created)
            return
        if validate_only:
            console.print(f"valid; {created.resource_estimate.explanation}", markup=False)
            return
        console.print(f"created {created.name} ({state(created.state)})", markup=False)
        if follow:
            follow_job(tunefleet, created.name, output)


@jobs.command("list")
@click.option("--filter", "filter_text", default="", help="Such as state=RUNNING.")
@output_option
@handles_errors
@calls("TrainingService.ListTrainingJobs")
def list_jobs(filter_text: str, output: str) -> None:
    """List training jobs, newest first."""
    with client() as tunefleet:
        items = list(tunefleet.training_jobs.list(filter=filter_text))
    listing(
        items,
        output,
        ["NAME", "STATE", "BASE MODEL", "ADAPTER", "STEP", "LOSS", "CREATED"],
        lambda j: (
            j.name,
            state(j.state),
            j.base_model,
            j.output_adapter_version or j.adapter,
            f"{j.latest_progress.step}/{j.latest_progress.total_steps}",
            f"{j.latest_progress.train_loss:.4f}" if j.latest_progress.step else "-",
            when(j.create_time),
        ),
    )


@jobs.command()
@click.argument("name")
@output_option
@handles_errors
@calls("TrainingService.GetTrainingJob")
def get(name: str, output: str) -> None:
    """Show a job: state, progress, evaluation and result."""
    with client() as tunefleet:
        job = tunefleet.training_jobs.get(name)
    if output == "json":
        print_json(job)
        return
    progress, evaluation = job.latest_progress, job.evaluation
    rows: list[tuple[str, Any]] = [
        ("name", job.name),
        ("state", state(job.state)),
        ("base model", job.base_model),
        ("method", enum_name(common_pb2.TrainingMethod, job.method, "TRAINING_METHOD_")),
        (
            "objective",
            enum_name(training_job_pb2.TrainingObjective, job.objective, "TRAINING_OBJECTIVE_"),
        ),
        ("dataset", job.train_dataset),
        ("adapter", job.adapter),
        ("launcher", f"{job.launcher} {job.launcher_run_id}".strip() or "-"),
        (
            "progress",
            f"step {progress.step}/{progress.total_steps}, loss {progress.train_loss:.4f}",
        ),
        ("created", when(job.create_time)),
        ("ended", when(job.end_time)),
    ]
    if job.HasField("evaluation"):
        rows.append(
            (
                "validation loss",
                f"{evaluation.base_validation_loss:.4f} (base) -> {evaluation.validation_loss:.4f}",
            )
        )
    if evaluation.HasField("reward_accuracy"):
        rows.append(
            (
                "reward accuracy",
                f"{evaluation.reward_accuracy:.3f}, margin {evaluation.reward_margin:.3f}",
            )
        )
    if job.output_adapter_version:
        rows.append(("result", job.output_adapter_version))
    if job.HasField("error"):
        rows.append(("error", f"{job.error.reason}: {job.error.message}"))
    fields(rows)


@jobs.command()
@click.argument("name")
@output_option
@handles_errors
@calls("TrainingService.CancelTrainingJob")
def cancel(name: str, output: str) -> None:
    """Cancel a job; it ends CANCELLED once its worker has stopped."""
    with client() as tunefleet:
        job = tunefleet.training_jobs.cancel(name)
    if output == "json":
        print_json(job)
        return
    console.print(f"{job.name} is {state(job.state)}", markup=False)


@jobs.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@output_option
@handles_errors
@calls("TrainingService.StreamTrainingJobEvents", "TrainingService.GetTrainingJob")
def logs(name: str, follow: bool, output: str) -> None:
    """Print a job's events: state changes, the loss table, checkpoints, the worker's log lines.

    With --follow, a progress bar with the ETA runs below the table until the job ends, and the
    exit code is 0 only when the job SUCCEEDED.
    """
    with client() as tunefleet:
        if follow:
            follow_job(tunefleet, name, output)
            return
        for event in tunefleet.training_jobs.events(name, follow=False):
            if output == "json":
                print_json_line(event)
            else:
                show_event(event)


def show_event(event: training_job_pb2.TrainingEvent) -> None:
    if event.HasField("state_change"):
        console.print(f"[bold]{state(event.state_change.state)}[/]")
    elif event.HasField("progress"):
        p = event.progress
        validation = f"{p.validation_loss:9.4f}" if p.HasField("validation_loss") else " " * 9
        rewards = (
            f" reward accuracy {p.reward_accuracy:.3f}" if p.HasField("reward_accuracy") else ""
        )
        console.print(
            f"step {p.step:>5}/{p.total_steps:<5} loss {p.train_loss:8.4f} val {validation} "
            f"lr {p.learning_rate:.2e} {p.tokens_per_second:7.0f} tok/s{rewards}",
            markup=False,
        )
    elif event.HasField("checkpoint"):
        console.print(f"checkpoint at step {event.checkpoint.step}: {event.checkpoint.uri}")
    elif event.HasField("log"):
        console.print(f"  | {event.log.text}", markup=False)
    elif event.HasField("evaluation"):
        e = event.evaluation
        console.print(
            f"evaluation: validation loss {e.base_validation_loss:.4f} (base) -> "
            f"{e.validation_loss:.4f}",
            markup=False,
        )
    elif event.HasField("error"):
        console.print(f"[red]error[/] {event.error.reason}: {event.error.message}")


def follow_job(tunefleet: Client, name: str, output: str) -> None:
    progress = counting_progress(output)
    with progress:
        task = progress.add_task("training", total=None)

        def show(event: training_job_pb2.TrainingEvent) -> None:
            if output == "json":
                print_json_line(event)
                return
            show_event(event)
            if event.HasField("progress"):
                p = event.progress
                progress.update(
                    task,
                    completed=p.step,
                    total=p.total_steps or None,
                    description=f"loss {p.train_loss:.4f}",
                )

        job = tunefleet.training_jobs.wait(name, on_event=show)
    if output != "json":
        result = job.output_adapter_version or (job.error.reason if job.HasField("error") else "")
        console.print(f"{job.name} {state(job.state)} {result}".rstrip(), markup=False)
    if job.state != TrainingJob.STATE_SUCCEEDED:
        raise SystemExit(1)


@jobs.command()
@click.argument("name")
@output_option
@handles_errors
@calls("TrainingService.ListCheckpoints")
def checkpoints(name: str, output: str) -> None:
    """List the job's stored checkpoints, oldest first: step, validation loss, size, where."""
    with client() as tunefleet:
        items = list(tunefleet.training_jobs.checkpoints(name))
    listing(
        items,
        output,
        ["STEP", "VALIDATION LOSS", "SIZE", "CREATED", "URI"],
        lambda c: (
            c.step,
            f"{c.validation_loss:.4f}" if c.HasField("validation_loss") else "-",
            size(c.size_bytes),
            when(c.create_time),
            c.uri,
        ),
    )
