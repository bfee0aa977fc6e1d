"""Prometheus metrics of evaluation jobs: each finished job's scores, so rules can alert on an
adapter's quality as they do on its latency, and the jobs themselves.

Scores are labelled like InferenceService's series (`adapter="adapters/x"`,
`version="adapters/x/versions/3"`, both empty for the base model and external endpoints), with
the grader, the dataset and the candidate's name in the job (a base model and its prompting
baseline differ only there). A series keeps the latest finished job's value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from tunefleet.v1 import evaluation_pb2

LABELS = ["adapter", "version", "grader", "dataset", "candidate"]
STATES = ["succeeded", "failed", "cancelled"]


class EvaluationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.score = Gauge(
            "tunefleet_evaluation_score",
            "Mean score (0 to 1) of a candidate under a grader in the latest finished evaluation.",
            LABELS,
            registry=registry,
        )
        self.score_low = Gauge(
            "tunefleet_evaluation_score_ci_low",
            "Lower end of the score's 95% interval.",
            LABELS,
            registry=registry,
        )
        self.score_high = Gauge(
            "tunefleet_evaluation_score_ci_high",
            "Upper end of the score's 95% interval.",
            LABELS,
            registry=registry,
        )
        self.gate = Gauge(
            "tunefleet_evaluation_gate_passed",
            "1 when the latest evaluation's gate passed the candidate, 0 when it did not.",
            ["adapter", "version", "dataset", "candidate"],
            registry=registry,
        )
        self.jobs = Counter(
            "tunefleet_evaluation_jobs_ended",
            "Evaluation jobs that ended, by final state.",
            ["state"],
            registry=registry,
        )
        self.running = Gauge(
            "tunefleet_evaluation_jobs_running", "Evaluation jobs running now.", registry=registry
        )
        self.answers = Counter(
            "tunefleet_evaluation_answers",
            "Answers graded, by outcome (`ok`, or `fault` when a grader or the model failed).",
            ["outcome"],
            registry=registry,
        )
        for state in STATES:
            self.jobs.labels(state)
        for outcome in ("ok", "fault"):
            self.answers.labels(outcome)

    def graded(self, faults: int) -> None:
        """One answer graded, with `faults` graders that could not grade it."""
        self.answers.labels("fault" if faults else "ok").inc()

    def ended(self, job: evaluation_pb2.EvaluationJob) -> None:
        state = evaluation_pb2.EvaluationJob.State.Name(job.state).removeprefix("STATE_").lower()
        if state in STATES:
            self.jobs.labels(state).inc()
        if job.state != evaluation_pb2.EvaluationJob.State.STATE_SUCCEEDED:
            return
        versions = {c.name: c.adapter_version for c in job.candidates}
        for result in job.results:
            version = versions.get(result.candidate, "")
            adapter = version.split("/versions/")[0] if version else ""
            where = (adapter, version)
            for score in result.scores:
                labels = (*where, score.grader, job.dataset, result.candidate)
                self.score.labels(*labels).set(score.mean)
                self.score_low.labels(*labels).set(score.ci_low)
                self.score_high.labels(*labels).set(score.ci_high)
            if result.HasField("gate_passed"):
                self.gate.labels(*where, job.dataset, result.candidate).set(
                    float(result.gate_passed)
                )
