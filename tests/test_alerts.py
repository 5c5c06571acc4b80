"""examples/prometheus/alerts.yaml: valid rules (`promtool check rules`) that fire when they should and not
otherwise (`promtool test rules` with alerts.test.yaml), over the metrics `meshca serve` exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support.softhsm import skip_or_fail

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "prometheus"
RULES = EXAMPLES / "alerts.yaml"
UNIT_TESTS = EXAMPLES / "alerts.test.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        skip_or_fail("promtool is not installed (apt-get install prometheus)")
    assert found is not None
    return found


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=EXAMPLES, timeout=60, check=False)


def test_the_rules_are_valid(promtool: str) -> None:
    checked = _promtool(promtool, "check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 10 rules found" in checked.stdout  # 9 alerts and 1 recording rule


def test_every_alert_fires_when_it_should_and_not_otherwise(promtool: str) -> None:
    tested = _promtool(promtool, "test", "rules", UNIT_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_unit_tests_catch_a_wrong_expectation(promtool: str, tmp_path: Path) -> None:
    # the unit tests compare labels and annotations: a changed expectation fails them
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / UNIT_TESTS.name).write_text(UNIT_TESTS.read_text().replace("instance: legacy}", "instance: x}"))
    tested = subprocess.run(
        [promtool, "test", "rules", UNIT_TESTS.name], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert tested.returncode != 0 and "FAILED" in tested.stdout + tested.stderr


def _rules() -> list[dict[str, str]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for rule in _rules() if "alert" in rule}


def test_every_recording_rule_has_a_unit_test() -> None:
    recorded = {rule["record"] for rule in _rules() if "record" in rule}
    tested = set(re.findall(r"- expr: ([\w:]+)\n", UNIT_TESTS.read_text()))
    assert recorded and recorded <= tested


def test_every_alert_has_a_unit_test_that_sees_it_fire() -> None:
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", UNIT_TESTS.read_text()))
    silent = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", UNIT_TESTS.read_text()))
    assert fired == set(_alerts()), "each alert needs a case where it fires"
    assert len(silent) >= 6, "and cases where it must not"


def test_the_rules_use_metrics_meshca_exports() -> None:
    names = {m for rule in _rules() for m in re.findall(r"\bmeshca_[a-z_]+", rule["expr"])}
    source = "".join(p.read_text() for p in (Path(__file__).resolve().parent.parent / "meshca" / "server").glob("*.py"))
    exported = {n for n in names if n.removesuffix("_total") in source}
    assert names == exported  # with their labels, scraped from a real service: tests/server/test_alert_metrics.py
