"""deploy/monitoring: the alert rules pass promtool and fire when they should, and the rules and
the dashboard name only metrics that tunefleet exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import require_tool
from tunefleet.adapters.metrics import AdapterMetrics
from tunefleet.datasets.metrics import DatasetMetrics
from tunefleet.evaluation.metrics import EvaluationMetrics
from tunefleet.inference.metrics import InferenceMetrics
from tunefleet.retraining.metrics import RetrainingMetrics
from tunefleet.runtime.metrics import ServerMetrics
from tunefleet.training.metrics import TrainingMetrics

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


def exported_series() -> set[str]:
    """The names of every series tunefleet's services expose (before any label is seen), and of
    their families (which alert descriptions mention)."""
    registry = ServerMetrics().registry
    InferenceMetrics(registry)
    TrainingMetrics(registry)
    DatasetMetrics(registry)
    EvaluationMetrics(registry)
    RetrainingMetrics(registry)
    AdapterMetrics(registry, watchers=lambda: 0)
    return {
        family.name + suffix
        for family in registry.collect()
        if family.name.startswith("tunefleet_")
        for suffix in ("", *SUFFIXES[family.type])
    }


def rule_groups() -> dict[str, object]:
    rule = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    spec: dict[str, object] = rule["spec"]
    return spec


def alert_names() -> set[str]:
    """The alerts of the rules file (its recording rules left out)."""
    rules = [r for g in rule_groups()["groups"] for r in g["rules"]]  # type: ignore[attr-defined]
    return {r["alert"] for r in rules if "alert" in r}


@pytest.mark.promtool
def test_rules_pass_promtool_and_their_unit_tests(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "Debian package prometheus")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    shutil.copy(Path(__file__).with_name("rules_test.yaml"), tmp_path)
    for command in (["check", "rules", "rules.yaml"], ["test", "rules", "rules_test.yaml"]):
        result = subprocess.run(
            [promtool, *command], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (tmp_path / "rules_test.yaml").read_text()))
    untested = {"TunefleetAdapterLatencyHigh", "TunefleetTrainingQueueBacklog"}
    assert alert_names() - tested <= untested  # both have cases in test_first_events.py


def test_rules_and_dashboard_name_only_exported_metrics() -> None:
    exported = exported_series()
    assert "tunefleet_inference_feedback_score_sum" in exported
    for path in ("prometheus-rules.yaml", "grafana-dashboard.json"):
        named = set(re.findall(r"tunefleet_[a-z0-9_]+", (MONITORING / path).read_text()))
        named -= {"tunefleet_grafana_dashboard"}
        assert named, path
        assert named <= exported, f"{path} names unknown metrics: {sorted(named - exported)}"


def test_the_dashboard_has_per_adapter_panels() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "adapter" in variables and variables["adapter"]["includeAll"]
    per_adapter = [
        panel["title"]
        for panel in dashboard["panels"]
        if any('adapter=~"$adapter"' in t["expr"] for t in panel.get("targets", []))
    ]
    assert len(per_adapter) >= 5
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_component_lists_its_files() -> None:
    component = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    files = [*component["resources"], *component["configMapGenerator"][0]["files"]]
    assert all((MONITORING / name).is_file() for name in files)
