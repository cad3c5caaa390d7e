"""deploy/prometheus/alerts.yml and deploy/grafana/examhook-dashboard.json: the rules pass
``promtool check rules`` and their unit tests (``promtool test rules``: failures appearing,
backlog age growing, no worker alive, receiver answering 5xx, unknown outcomes...), and every
examhook metric the rules, their tests and the dashboard use is one the receiver or the
worker exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ingest.metrics import ReceiverMetrics
from worker.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "examhook-dashboard.json"
METRIC = re.compile(r"\bexamhook_[a-z_]+")
ISSUE_ALERTS = {
    "ExamhookDeliveriesFailing",  # failures appearing
    "ExamhookBacklogAgeGrowing",  # backlog age growing
    "ExamhookNoWorker",  # no worker alive
    "ExamhookReceiverErrors",  # receiver answering 5xx
    "ExamhookUnknownOutcomes",  # unknown-outcome sends
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing: `apt-get install prometheus` provides it (.ci/run installs it)")
    return path


def test_promtool_checks_the_rules() -> None:
    """`promtool check rules` accepts alerts.yml."""
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """`promtool test rules alerts.test.yml`: each alert fires when, and only when, its series
    say so, with the expected labels and annotations."""
    done = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS.name)],
        capture_output=True,
        text=True,
        check=False,
        cwd=RULE_TESTS.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_issue_s_alerts_exist_and_each_has_a_unit_test() -> None:
    """The alerts the issue asks for are there, and every alert is exercised (firing) by at
    least one unit test."""
    rules = yaml.safe_load(RULES.read_text())
    names = {r["alert"] for group in rules["groups"] for r in group["rules"] if "alert" in r}
    assert names >= ISSUE_ALERTS
    tests = yaml.safe_load(RULE_TESTS.read_text())
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert names == fired, names ^ fired


def exported() -> set[str]:
    """Every sample name the receiver's and the worker's registries can export."""
    names: set[str] = set()
    for registry in (ReceiverMetrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            if family.type == "counter":
                names |= {family.name + "_total", family.name + "_created"}
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
            else:
                names.add(family.name)
    return names


@pytest.mark.parametrize("path", [RULES, RULE_TESTS, DASHBOARD], ids=lambda p: p.name)
def test_every_metric_used_is_exported(path: Path) -> None:
    """A rule or panel over a metric nobody exports would never fire or show anything."""
    used = set(METRIC.findall(path.read_text()))
    assert used, "no examhook metric used at all?"
    assert used <= exported(), used - exported()


def test_dashboard_is_grafana_json_over_the_metrics() -> None:
    """The dashboard is JSON Grafana imports: unique panel ids, a Prometheus data source
    variable, and among its panels failures and end-to-end lag per integration."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    assert 'examhook_worker_deliveries_total{outcome="failed"}' in exprs
    assert "examhook_worker_delivery_lag_seconds_bucket" in exprs
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
