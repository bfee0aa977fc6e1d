"""`tunefleet retraining ...`: policies that retrain an adapter from its feedback, and runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from tunefleet.cli.evaluations import show as show_evaluation
from tunefleet.cli.output import (
    calls,
    client,
    console,
    deleted,
    enum_name,
    fields,
    handles_errors,
    listing,
    output_option,
    print_json,
    show,
    table,
    when,
)
from tunefleet.client import Client
from tunefleet.v1 import retraining_pb2

Run = retraining_pb2.RetrainingRun


def state(value: int) -> str:
    return enum_name(Run.State, value, "STATE_")


def outcome(run: Run) -> str:
    if run.state != Run.STATE_SUCCEEDED:
        return run.error_reason or "-"
    return enum_name(Run.Outcome, run.outcome, "OUTCOME_")


@click.group("retraining")
def retraining() -> None:
    """Retrain adapters from production feedback, judged against the version serving."""


@retraining.command("create-policy")
@click.option("--adapter", help="The adapter retrained: adapters/{id}.")
@click.option("--eval-dataset", help="The frozen evaluation set: datasets/{id} (train split).")
@click.option("--grader", "graders", multiple=True, help="A grader of the comparison, repeatable.")
@click.option("--gate", "gate_metric", help="The grader the challenger must be better on.")
@click.option("--min-improvement", type=float, help="The gate's least improvement.")
@click.option("--auto", is_flag=True, help="Promote without approval when the gate passes.")
@click.option("--min-new-examples", type=int, help="New examples a run needs (default 10).")
@click.option("--id", "policy_id", default="", help="The policy id (default the adapter's).")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A RetrainingPolicy in JSON; the other options add to it.",
)
@output_option
@handles_errors
@calls("RetrainingService.CreateRetrainingPolicy")
def create_policy(
    adapter: str | None,
    eval_dataset: str | None,
    graders: tuple[str, ...],
    gate_metric: str | None,
    min_improvement: float | None,
    auto: bool,
    min_new_examples: int | None,
    policy_id: str,
    from_file: Path | None,
    output: str,
) -> None:
    """Create the retraining policy of an adapter.

    \b
    tunefleet retraining create-policy --adapter adapters/orders \\
        --eval-dataset datasets/FROZEN --grader exact_match --gate exact_match --auto
    """
    policy: dict[str, Any] = {}
    if from_file:
        try:
            policy = json.loads(from_file.read_text())
        except ValueError as error:
            raise click.BadParameter(f"not JSON: {error}", param_hint="--from-file") from None
        if not isinstance(policy, dict):
            raise click.BadParameter("expected a JSON object", param_hint="--from-file")
    if adapter:
        policy["adapter"] = adapter
    evaluation = policy.setdefault("evaluation", {})
    if eval_dataset:
        evaluation.update(dataset=eval_dataset, split="DATASET_SPLIT_TRAIN")
    evaluation.setdefault("graders", []).extend({"type": grader} for grader in graders)
    if gate_metric:
        evaluation.setdefault("gate", {})["metric"] = gate_metric
    if min_improvement is not None:
        evaluation.setdefault("gate", {})["minImprovement"] = min_improvement
    if auto:
        policy["promotion"] = "PROMOTION_AUTO"
    if min_new_examples is not None:
        policy.setdefault("data", {})["minNewExamples"] = min_new_examples
    with client() as tunefleet:
        created = tunefleet.retraining.create_policy(policy, policy_id=policy_id)
    if output == "json":
        print_json(created)
    else:
        console.print(f"created {created.name} for {created.adapter}", markup=False)


@retraining.command("policies")
@output_option
@handles_errors
@calls("RetrainingService.ListRetrainingPolicies")
def policies(output: str) -> None:
    """List retraining policies."""
    with client() as tunefleet:
        items = list(tunefleet.retraining.policies())
    promotion = retraining_pb2.RetrainingPolicy.Promotion
    listing(
        items,
        output,
        ["NAME", "ADAPTER", "CHAMPION", "CHALLENGER", "PROMOTION", "EVALUATION SET"],
        lambda p: (
            p.name,
            p.adapter,
            p.champion_alias,
            p.challenger_alias,
            enum_name(promotion, p.promotion, "PROMOTION_"),
            p.evaluation.dataset,
        ),
    )


@retraining.command("get-policy")
@click.argument("name")
@output_option
@handles_errors
@calls("RetrainingService.GetRetrainingPolicy")
def get_policy(name: str, output: str) -> None:
    """Show a policy: its adapter and aliases, the recipe, the evaluation, gate and triggers."""
    with client() as tunefleet:
        show(tunefleet.retraining.get_policy(name), output)


@retraining.command("delete-policy")
@click.argument("name")
@output_option
@handles_errors
@calls("RetrainingService.DeleteRetrainingPolicy")
def delete_policy(name: str, output: str) -> None:
    """Delete a policy and its runs (refused while a run is in progress)."""
    with client() as tunefleet:
        tunefleet.retraining.delete_policy(name)
    deleted(name, output)


@retraining.command("run")
@click.argument("policy")
@click.option("--wait", "-w", is_flag=True, help="Wait until it ends or awaits approval.")
@output_option
@handles_errors
@calls("RetrainingService.CreateRetrainingRun", "RetrainingService.WatchRetrainingRun")
def start(policy: str, wait: bool, output: str) -> None:
    """Start a run of POLICY now. With -w, exit 1 unless the run SUCCEEDED, 3 when it did
    without promoting (the gate, a person or a concurrent move said no)."""
    with client() as tunefleet:
        run = tunefleet.retraining.start(policy)
        if output != "json":
            console.print(f"started {run.name}", markup=False)
        if wait:

            def changed(current: Run) -> None:
                if output != "json" and current.events:
                    step = state(current.state).lower()
                    console.print(f"  {step}: {current.events[-1].message}", markup=False)

            run = tunefleet.retraining.wait(
                run.name,
                until=lambda r: r.state in (Run.STATE_AWAITING_APPROVAL, *ENDED),
                on_change=changed,
            )
            report(tunefleet, run, output)
            if run.state != Run.STATE_SUCCEEDED and run.state != Run.STATE_AWAITING_APPROVAL:
                raise SystemExit(1)
            if run.state == Run.STATE_SUCCEEDED and run.outcome != Run.OUTCOME_PROMOTED:
                raise SystemExit(3)
        elif output == "json":
            print_json(run)


ENDED = (Run.STATE_SUCCEEDED, Run.STATE_FAILED, Run.STATE_CANCELLED)


@retraining.command("runs")
@click.argument("policy")
@output_option
@handles_errors
@calls("RetrainingService.ListRetrainingRuns")
def runs(policy: str, output: str) -> None:
    """List a policy's runs, newest first."""
    with client() as tunefleet:
        items = list(tunefleet.retraining.runs(policy))
    trigger = Run.Trigger
    listing(
        items,
        output,
        ["NAME", "STATE", "OUTCOME", "TRIGGER", "CHALLENGER", "CREATED"],
        lambda r: (
            r.name,
            state(r.state),
            outcome(r),
            enum_name(trigger, r.trigger, "TRIGGER_"),
            r.challenger_version or "-",
            when(r.create_time),
        ),
    )


@retraining.command("get")
@click.argument("name")
@output_option
@handles_errors
@calls("RetrainingService.GetRetrainingRun", "EvaluationService.GetEvaluationJob")
def get(name: str, output: str) -> None:
    """Show a run: its data, job, the gate's table and its history."""
    with client() as tunefleet:
        report(tunefleet, tunefleet.retraining.get_run(name), output)


def report(tunefleet: Client, run: Run, output: str) -> None:
    if output == "json":
        print_json(run)
        return
    gate = "-" if not run.HasField("gate_passed") else ("passed" if run.gate_passed else "failed")
    fields(
        [
            ("name", run.name),
            ("state", state(run.state)),
            ("outcome", outcome(run)),
            ("champion", run.champion_version or "-"),
            ("challenger", run.challenger_version or "-"),
            ("examples", f"{run.sft_examples} SFT, {run.preference_pairs} pairs"),
            ("held out", run.held_out_examples),
            ("feedback", len(run.feedback)),
            ("dataset", run.train_dataset or "-"),
            ("training job", run.training_job or "-"),
            ("gate", gate),
            *(("why", reason) for reason in run.gate_reasons),
            *((("error", f"{run.error_reason}: {run.error_message}"),) if run.error_reason else ()),
        ]
    )
    for name in run.evaluation_jobs:
        console.print()
        show_evaluation(tunefleet.evaluations.get(name))
    console.print()
    table(
        ["TIME", "STATE", "WHO", "WHAT"],
        [(when(e.time), state(e.state), e.actor or "-", e.message) for e in run.events],
    )


@retraining.command("approve")
@click.argument("name")
@click.option("--reason", default="", help="Why; kept in the run and the alias's history.")
@output_option
@handles_errors
@calls("RetrainingService.ApproveRetrainingRun")
def approve(name: str, reason: str, output: str) -> None:
    """Approve the promotion of a run awaiting approval."""
    with client() as tunefleet:
        run = tunefleet.retraining.approve(name, reason=reason)
    if output == "json":
        print_json(run)
    else:
        console.print(f"{run.name}: {outcome(run)}", markup=False)


@retraining.command("reject")
@click.argument("name")
@click.option("--reason", default="", help="Why; kept in the run.")
@output_option
@handles_errors
@calls("RetrainingService.RejectRetrainingRun")
def reject(name: str, reason: str, output: str) -> None:
    """Reject the promotion of a run awaiting approval."""
    with client() as tunefleet:
        run = tunefleet.retraining.reject(name, reason=reason)
    if output == "json":
        print_json(run)
        return
    console.print(f"{run.name}: {outcome(run)}", markup=False)


@retraining.command("cancel")
@click.argument("name")
@output_option
@handles_errors
@calls("RetrainingService.CancelRetrainingRun")
def cancel(name: str, output: str) -> None:
    """Cancel a run in progress (and its training job)."""
    with client() as tunefleet:
        run = tunefleet.retraining.cancel(name)
    if output == "json":
        print_json(run)
        return
    console.print(f"{run.name}: {state(run.state)}", markup=False)
