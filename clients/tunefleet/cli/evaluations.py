"""`tunefleet eval ...`"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import Any

import click
from rich.panel import Panel
from rich.text import Text

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
    table,
    when,
)
from tunefleet.client import Client
from tunefleet.core.graders import BY_NAME as GRADER_NAMES
from tunefleet.v1 import evaluation_pb2

EvaluationJob = evaluation_pb2.EvaluationJob


def state(value: int) -> str:
    return enum_name(EvaluationJob.State, value, "STATE_")


def verdict(value: int) -> str:
    return enum_name(evaluation_pb2.EvaluationVerdict, value, "EVALUATION_VERDICT_").lower()


def _pairs(values: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        key, equals, rest = value.partition("=")
        if not equals or not key:
            raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint=option)
        pairs.append((key, rest))
    return pairs


@click.group("eval")
def evaluations() -> None:
    """Judge adapters against a baseline: scores with intervals, paired tests, a gate."""


@evaluations.command()
@click.option("--dataset", help="The items: datasets/{id} (its validation split by default).")
@click.option(
    "--candidate",
    "candidates",
    multiple=True,
    metavar="NAME[=ADAPTER]",
    help="A model to judge, repeatable: NAME alone is the base model, NAME=adapters/x@prod or "
    "NAME=adapters/x/versions/3 an adapter. The first is the baseline unless --baseline says.",
)
@click.option(
    "--system-prompt",
    "system_prompts",
    multiple=True,
    metavar="NAME=TEXT",
    help="A system prompt for candidate NAME (a prompting baseline), repeatable.",
)
@click.option("--baseline", default="", help="The candidate the others are compared with.")
@click.option(
    "--grader",
    "graders",
    multiple=True,
    type=click.Choice(GRADER_NAMES),
    help="A grader, repeatable (judges, string checks and JSON schemas: --from-file).",
)
@click.option(
    "--contains",
    is_flag=True,
    help="Add the grader string_check like: the reference within the answer.",
)
@click.option(
    "--normalise",
    is_flag=True,
    help="exact_match and --contains compare after SQuAD's normalisation (case, punctuation, "
    "articles); --contains then matches whole words.",
)
@click.option(
    "--split",
    type=click.Choice(["validation", "train"]),
    help="The side of the dataset to read (default validation; `eval suite --upload` puts "
    "all in train).",
)
@click.option("--gate", "gate_metric", help="The grader a candidate must be better on to pass.")
@click.option("--min-improvement", type=float, help="The gate's least improvement.")
@click.option(
    "--regression-grader",
    "regression_graders",
    multiple=True,
    help="A grader on which the gate allows no significant regression, repeatable.",
)
@click.option("--max-items", type=int, help="At most this many items (default all).")
@click.option("--max-tokens", type=int, help="Longest answer (default 256).")
@click.option("--name", "display_name", default="")
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An EvaluationJob in JSON; the other options add to it.",
)
@click.option("--validate-only", is_flag=True, help="Check the job only.")
@click.option(
    "--wait",
    "-w",
    is_flag=True,
    help="Then wait for the results; exit 1 unless the job SUCCEEDED, 3 when it did but the "
    "gate did not pass a candidate.",
)
@output_option
@handles_errors
@calls(
    "EvaluationService.CreateEvaluationJob",
    "EvaluationService.WatchEvaluationJob",
    "EvaluationService.GetEvaluationJob",
)
def create(
    dataset: str | None,
    candidates: tuple[str, ...],
    system_prompts: tuple[str, ...],
    baseline: str,
    graders: tuple[str, ...],
    contains: bool,
    normalise: bool,
    split: str | None,
    gate_metric: str | None,
    min_improvement: float | None,
    regression_graders: tuple[str, ...],
    max_items: int | None,
    max_tokens: int | None,
    display_name: str,
    from_file: Path | None,
    validate_only: bool,
    wait: bool,
    output: str,
) -> None:
    """Start an evaluation.

    \b
    tunefleet eval create --dataset datasets/D --candidate base \\
        --candidate tuned=adapters/orders@prod --grader exact_match --gate exact_match -w
    """
    job: dict[str, Any] = {}
    if from_file:
        try:
            job = json.loads(from_file.read_text())
        except ValueError as error:
            raise click.BadParameter(f"not JSON: {error}", param_hint="--from-file") from None
        if not isinstance(job, dict):
            raise click.BadParameter(
                "expected a JSON object (an EvaluationJob)", param_hint="--from-file"
            )
    listed = job.setdefault("candidates", [])
    for name, adapter in (c.partition("=")[::2] for c in candidates):
        listed.append({"name": name, "adapter": adapter} if adapter else {"name": name})
    for name, prompt in _pairs(system_prompts, "--system-prompt"):
        found = [c for c in listed if c.get("name") == name]
        if not found:
            raise click.BadParameter(f"{name!r} is not a candidate", param_hint="--system-prompt")
        found[0]["systemPrompt"] = prompt
    job.setdefault("graders", []).extend({"type": grader} for grader in graders)
    if contains:
        job["graders"].append({"type": "string_check", "operation": "like"})
    if normalise:
        for grader in job["graders"]:
            kind, operation = grader.get("type"), grader.get("operation")
            if kind == "exact_match" or (kind == "string_check" and operation != "regex"):
                grader["normalise"] = True
    if split is not None:
        job["split"] = f"DATASET_SPLIT_{split.upper()}"
    given = {
        "dataset": dataset,
        "baseline": baseline or None,
        "displayName": display_name or None,
        "maxItems": max_items,
    }
    job.update({key: value for key, value in given.items() if value is not None})
    if max_tokens is not None:
        job.setdefault("sampling", {})["maxTokens"] = max_tokens
    if gate_metric is not None:
        job.setdefault("gate", {})["metric"] = gate_metric
    if min_improvement is not None:
        job.setdefault("gate", {})["minImprovement"] = min_improvement
    if regression_graders:
        job.setdefault("gate", {}).setdefault("regressionGraders", []).extend(regression_graders)
    with client() as tunefleet:
        created = tunefleet.evaluations.create(job, validate_only=validate_only)
        if validate_only:
            if output == "json":
                print_json(created)
            else:
                console.print("valid", markup=False)
            return
        if output != "json":
            console.print(f"created {created.name} ({state(created.state)})", markup=False)
        elif not wait:
            print_json(created)
            return
        if wait:
            finish(tunefleet, created.name, output)


@evaluations.command("list")
@output_option
@handles_errors
@calls("EvaluationService.ListEvaluationJobs")
def list_jobs(output: str) -> None:
    """List evaluation jobs, newest first."""
    with client() as tunefleet:
        items = list(tunefleet.evaluations.list())
    listing(
        items,
        output,
        ["NAME", "STATE", "DATASET", "CANDIDATES", "ANSWERS", "CREATED"],
        lambda j: (
            j.name,
            state(j.state),
            j.dataset,
            ", ".join(c.name for c in j.candidates),
            f"{j.answers_done}/{j.answers_total}",
            when(j.create_time),
        ),
    )


@evaluations.command()
@click.argument("name")
@output_option
@handles_errors
@calls("EvaluationService.GetEvaluationJob")
def get(name: str, output: str) -> None:
    """Show a job: its candidates, then per candidate and grader the score with its 95%
    interval and the paired comparison with the baseline (difference, interval, p-value,
    verdict), and the gate's verdict."""
    with client() as tunefleet:
        job = tunefleet.evaluations.get(name)
    if output == "json":
        print_json(job)
        return
    show(job)


def show(job: evaluation_pb2.EvaluationJob) -> None:
    rows: list[tuple[str, Any]] = [
        ("name", job.name),
        ("state", state(job.state)),
        ("dataset", job.dataset),
        ("answers", f"{job.answers_done}/{job.answers_total}"),
        ("baseline", job.baseline),
    ]
    for candidate in job.candidates:
        model = candidate.adapter_version or candidate.adapter or "base model"
        if candidate.HasField("endpoint"):
            model = f"{candidate.endpoint.model} at {candidate.endpoint.base_url}"
        prompted = " + system prompt" if candidate.system_prompt else ""
        prompted += f" + {len(candidate.few_shot)} example turns" if candidate.few_shot else ""
        rows.append((f"candidate {candidate.name}", f"{model}{prompted}"))
    rows += [("created", when(job.create_time)), ("ended", when(job.end_time))]
    if job.error_reason:
        rows.append(("error", f"{job.error_reason}: {job.error_message}"))
    fields(rows)
    if not job.results:
        return
    console.print()
    table(
        ["CANDIDATE", "GRADER", "N", "MEAN", "95% CI", "VS BASELINE", "95% CI", "P", "VERDICT"],
        [_score_row(result.candidate, score) for result in job.results for score in result.scores],
    )
    for result in job.results:
        for score in result.scores:
            if score.HasField("pairwise"):
                p = score.pairwise
                console.print(
                    f"{result.candidate} {score.grader}: {p.wins} wins, {p.ties} ties, "
                    f"{p.losses} losses; win rate {p.win_rate:.3f} [{p.win_rate_ci_low:.3f}, "
                    f"{p.win_rate_ci_high:.3f}]; the orders disagreed on "
                    f"{p.inconsistency_rate:.0%} of items",
                    markup=False,
                )
        if result.HasField("gate_passed"):
            verdict_text = "PASSED" if result.gate_passed else "FAILED"
            console.print(f"gate {result.candidate}: {verdict_text}", markup=False)
            for reason in result.gate_reasons:
                console.print(f"  - {reason}", markup=False)


def _score_row(candidate: str, score: evaluation_pb2.EvaluationScore) -> list[str]:
    errors = f" ({score.errors} faults)" if score.errors else ""
    row = [
        candidate,
        score.grader,
        f"{score.count}{errors}",
        f"{score.mean:.3f}",
        f"[{score.ci_low:.3f}, {score.ci_high:.3f}]",
    ]
    if not score.HasField("comparison"):
        return [*row, "-", "", "", "baseline"]
    c = score.comparison
    return [
        *row,
        f"{c.difference:+.3f}",
        f"[{c.ci_low:+.3f}, {c.ci_high:+.3f}]",
        f"{c.p_value:.3g} ({c.test})",
        verdict(c.verdict),
    ]


@evaluations.command()
@click.argument("name")
@output_option
@handles_errors
@calls("EvaluationService.CancelEvaluationJob")
def cancel(name: str, output: str) -> None:
    """Cancel a queued or running job."""
    with client() as tunefleet:
        job = tunefleet.evaluations.cancel(name)
    if output == "json":
        print_json(job)
        return
    console.print(f"{job.name} is {state(job.state)}", markup=False)


@evaluations.command("wait")
@click.argument("name")
@output_option
@handles_errors
@calls("EvaluationService.WatchEvaluationJob", "EvaluationService.GetEvaluationJob")
def wait_command(name: str, output: str) -> None:
    """Wait for a job to end, then show it: exit 1 unless it SUCCEEDED, 3 when it did but the
    gate did not pass a candidate."""
    with client() as tunefleet:
        finish(tunefleet, name, output)


def finish(tunefleet: Client, name: str, output: str) -> None:
    progress = counting_progress(output)
    with progress:
        task = progress.add_task("answers", total=None)

        def changed(job: evaluation_pb2.EvaluationJob) -> None:
            progress.update(task, completed=job.answers_done, total=job.answers_total or None)

        job = tunefleet.evaluations.wait(name, on_change=changed)
    if output == "json":
        print_json(job)
    else:
        show(job)
    if job.state != EvaluationJob.STATE_SUCCEEDED:
        raise SystemExit(1)
    if any(r.HasField("gate_passed") and not r.gate_passed for r in job.results):
        raise SystemExit(3)


@evaluations.command()
@click.argument("name")
@click.option("--candidate", default="", help="Only this candidate's answers.")
@click.option(
    "--below",
    nargs=2,
    metavar="GRADER SCORE",
    help="Only answers GRADER scored under SCORE (or could not grade): the failures.",
)
@output_option
@handles_errors
@calls("EvaluationService.ListEvaluationItemResults")
def items(name: str, candidate: str, below: tuple[str, str] | None, output: str) -> None:
    """List a job's answers with their scores, for failure analysis."""
    limit = None
    if below is not None:
        try:
            limit = (below[0], float(below[1]))
        except ValueError:
            raise click.BadParameter(
                f"{below[1]!r} is not a number", param_hint="--below"
            ) from None
    with client() as tunefleet:
        for item in tunefleet.evaluations.items(name, candidate=candidate):
            if limit is not None:
                grader, threshold = limit
                if grader in item.scores and item.scores[grader] >= threshold:
                    continue
            if output == "json":
                print_json_line(item)
                continue
            scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(item.scores.items()))
            faults = "; ".join(f"{k}: {v}" for k, v in sorted(item.errors.items()))
            faults = f"  faults: {faults}" if faults else ""
            console.print(f"#{item.index} {item.candidate}  {scores}{faults}", markup=False)
            answer = item.output if item.HasField("output") else "(no answer)"
            console.print(f"  answer:    {answer!r}", markup=False)
            console.print(f"  reference: {item.reference!r}", markup=False)
            for key, reply in sorted(item.judgements.items()):
                console.print(f"  {key}: {reply!r}", markup=False)


@evaluations.command()
@click.argument("suite", type=click.Choice(["general"]))
@click.option(
    "--output",
    "-O",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write its records (JSON lines) to this file.",
)
@click.option("--upload", is_flag=True, help="Upload it as a dataset (all records in train).")
@click.option(
    "--lm-eval",
    "lm_eval",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write it as a local lm-evaluation-harness task (tunefleet_general) to this directory.",
)
@output_option
@handles_errors
def suite(suite: str, path: Path | None, upload: bool, lm_eval: Path | None, output: str) -> None:
    """A suite that ships with tunefleet: `general` is 300 questions of knowledge, reasoning,
    instruction following and format, to see whether an adapter lost general skills.

    \b
    tunefleet eval suite general --upload    prints the dataset, then:
    tunefleet eval create --dataset D --split train --candidate base \\
        --candidate new=adapters/a@prod --grader exact_match --contains --normalise \\
        --grader kl_from_base -w
    """
    from tunefleet.suites import general, jsonl, write_lm_eval_task

    data = jsonl(general())
    if lm_eval is not None:
        task = write_lm_eval_task(lm_eval)
        if output != "json":
            console.print(f"wrote {task}: lm_eval --include_path {lm_eval} --tasks "
                          "tunefleet_general", markup=False)  # fmt: skip
    if path is not None:
        path.write_bytes(data)
        if output != "json":
            console.print(f"wrote {len(general())} records to {path}", markup=False)
    if upload:
        options = {
            "validationFraction": 0,
            "removeExactDuplicates": False,
            "removeNearDuplicates": False,
            "piiPolicy": "PII_POLICY_REPORT",  # written for the project: nothing to hide
        }
        with client() as tunefleet:
            dataset = tunefleet.datasets.upload(
                data, display_name=f"tunefleet-{suite}-suite", options=options
            )
        if output == "json":
            print_json(dataset)
        else:
            console.print(
                f"uploaded {dataset.name} ({dataset.train_record_count} records; evaluate "
                "with --split train)",
                markup=False,
            )
    if path is None and not upload and lm_eval is None:
        click.echo(data.decode(), nl=False)


@evaluations.command()
@click.argument("name")
@click.option("--candidate", required=True, help="The candidate compared with the baseline.")
@click.option("--baseline", default="", help="The other side (default the job's baseline).")
@click.option(
    "--annotator",
    default=lambda: os.environ.get("USER") or getpass.getuser(),
    show_default="$USER",
    help="Who judges: each annotator judges each item once.",
)
@handles_errors
@calls(
    "EvaluationService.CreateAnnotationTask",
    "EvaluationService.CreateAnnotation",
    "EvaluationService.GetAnnotationSummary",
)
def annotate(name: str, candidate: str, baseline: str, annotator: str) -> None:
    """Compare answers by hand (human A/B), in the terminal (it works over SSH): two answers to
    one item at a time, in random order and without names; press 1 or 2 for the better one, t
    for a tie, s to skip, q to stop. Ends with the tally: the candidate's win rate with its 95%
    interval."""
    keys = {"1": "first", "2": "second", "t": "tie"}
    with client() as tunefleet:
        while True:
            task = tunefleet.evaluations.annotation_task(
                name, candidate, annotator=annotator, baseline=baseline
            )
            if not task.name:
                console.print("Every item is judged: thank you.", markup=False)
                break
            console.clear()
            console.rule(Text(f"{task.remaining} left to judge, as {annotator}"))
            for turn in task.input:
                console.print(Text(f"{turn.role}: ", style="bold") + Text(turn.content))
            console.print(Panel(Text(task.first), title="1", title_align="left"))
            console.print(Panel(Text(task.second), title="2", title_align="left"))
            console.print(
                "Which is better? [bold]1[/] or [bold]2[/], [bold]t[/] tie, [bold]s[/] skip, "
                "[bold]q[/] quit"
            )
            key = click.getchar().lower()
            while key not in (*keys, "s", "q"):
                key = click.getchar().lower()
            if key == "q":
                break
            if key in keys:
                tunefleet.evaluations.annotate(task.name, keys[key])
        tally = tunefleet.evaluations.annotation_summary(name, candidate, baseline=baseline)
    console.print(
        f"{tally.candidate} against {tally.baseline}: {tally.wins} wins, {tally.losses} losses, "
        f"{tally.ties} ties from {tally.annotators} annotators; win rate {tally.win_rate:.3f} "
        f"[{tally.win_rate_ci_low:.3f}, {tally.win_rate_ci_high:.3f}]",
        markup=False,
    )
