"""Prometheus config, alert rules and the Grafana dashboard's PromQL, checked by promtool.

promtool comes from the Debian `prometheus` package that .ci/run installs; these tests fail (not
skip) without it. Metric names are also checked against the /metrics of a real server, so a
renamed metric breaks the dashboard and the alerts here, not in production.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers import start_server

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "musiq.json"
# Grafana's template variables, replaced by what they can expand to before promtool parses.
GRAFANA_VARS = {"$__rate_interval": "1m", "$model": ".*", "$protocol": ".*"}
PROMQL_WORDS = {
    "sum", "by", "rate", "histogram_quantile", "scalar", "or", "and", "unless", "on", "le", "max",
    "without", "count", "avg", "min", "increase", "avg_over_time", "sum_over_time",
}  # fmt: skip


def promtool(*args: str | Path, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: install the Debian package prometheus (.ci/run does)"
    return subprocess.run([exe, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (identifiers outside label matchers and strings)."""
    bare = re.sub(r"\{[^}]*\}|\"[^\"]*\"|\[[^\]]*\]", " ", expr)
    bare = re.sub(r"by \([^)]*\)|on \([^)]*\)", " ", bare)
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare) if w not in PROMQL_WORDS}


def test_config_and_rules_pass_promtool_check() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 18 rules found" in result.stdout


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", "rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The unit tests discriminate: an error-ratio threshold of 50 % instead of 5 % fails them."""
    rules = (PROM / "rules.yml").read_text()
    assert "musiq:request_errors:ratio_rate5m > 0.05" in rules
    (tmp_path / "rules.yml").write_text(rules.replace("ratio_rate5m > 0.05", "ratio_rate5m > 0.5"))
    shutil.copy(PROM / "rules_test.yml", tmp_path)
    result = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "MusiqHighErrorRatio" in result.stdout + result.stderr


SHIFT_RULE = {
    "over": "(musiq:score:p50_rate1h - musiq:score:p50_rate1w) > 0.1 * musiq:score_range:width",
    "under": "(musiq:score:p50_rate1h - musiq:score:p50_rate1w) < -0.1 * musiq:score_range:width",
    "hourly": "musiq:scored_images:increase1h >= 100",
    "for": "        for: 30m\n        labels:\n          severity: ticket",
}


@pytest.mark.parametrize(
    ("part", "broken"),
    [
        # Inverted: fires inside the band instead of outside it (the stable models would fire).
        ("over", "(musiq:score:p50_rate1h - musiq:score:p50_rate1w) < 0.1 * musiq:score_range:width"),
        # A fixed 10 points instead of 10 % of the model's range: the 1..10 model never fires.
        ("under", "(musiq:score:p50_rate1h - musiq:score:p50_rate1w) < -10"),
        # No traffic guard worth the name: 60 images an hour would decide.
        ("hourly", "musiq:scored_images:increase1h >= 10"),
        # No `for`: fires while the shift is still pending.
        ("for", "        for: 0m\n        labels:\n          severity: ticket"),
    ],
    ids=["inverted", "not-scaled-to-range", "no-traffic-guard", "no-for"],
)
def test_score_shift_unit_tests_catch_a_broken_rule(tmp_path: Path, part: str, broken: str) -> None:
    """MusiqScoreDistributionShift's unit tests fail when the rule loses any of its parts."""
    rules = (PROM / "rules.yml").read_text()
    assert rules.count(SHIFT_RULE[part]) == 1, part
    (tmp_path / "rules.yml").write_text(rules.replace(SHIFT_RULE[part], broken))
    shutil.copy(PROM / "rules_test.yml", tmp_path)
    result = promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert result.returncode != 0, part
    assert "MusiqScoreDistributionShift" in result.stdout + result.stderr


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables expanded, as a recording rule promtool parses."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unexpanded Grafana variable in {expr}"
        rules.append({"record": f"dashboard:panel_query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_dashboard_covers_the_required_views() -> None:
    text = " ".join(dashboard_exprs())
    for needle in (
        "musiq_requests_total",  # request and error rates
        "histogram_quantile(0.99, sum by (protocol, le) (rate(musiq_request_duration_seconds_bucket",
        "musiq_queue_depth",
        "musiq_batch_size",
        "musiq_batch_tokens",
        "musiq_real_tokens_total",  # padding efficiency
        "musiq_inference_duration_seconds_bucket",
        # served-score distribution (p10/p50/p90 over 1 h) against the weekly median it alerts on
        "histogram_quantile(0.5, sum by (model, le) (musiq:score_bucket:rate1h",
        "histogram_quantile(0.9, sum by (model, le) (musiq:score_bucket:rate1h",
        "musiq:score:p50_rate1w",
    ):
        assert needle in text, needle
    variables = {v["name"] for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert variables == {"model", "protocol"}


@pytest.fixture(scope="module")
def served_metric_names() -> set[str]:
    """Series names a real server exports after one scored image (histograms expanded)."""
    from service.settings import ServiceSettings
    from tests.helpers import jpeg

    srv, thread, url = start_server(ServiceSettings(grpc_enabled=False))
    try:
        assert httpx.post(
            f"{url}/v1/score", content=jpeg(), headers={"content-type": "image/jpeg"}
        ).is_success
        # A refused request, so the rejection counter has a series.
        httpx.post(f"{url}/v1/score", content=b"", headers={"content-type": "image/jpeg"})
        text = httpx.get(f"{url}/metrics").text
    finally:
        srv.should_exit = True
        thread.join(30)
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


def test_rules_and_dashboard_read_metrics_the_server_exports(served_metric_names: set[str]) -> None:
    rules = (PROM / "rules.yml").read_text()
    recorded = set(re.findall(r"record: (\S+)", rules))
    exprs = [*re.findall(r"expr: \|\n((?:\s{10}.*\n)+)", rules), *re.findall(r"expr: (.+)", rules)]
    used = set().union(*(metric_names(e) for e in [*exprs, *dashboard_exprs()]))
    unknown = used - served_metric_names - recorded - {"up"}
    assert not unknown, f"queried but not exported: {sorted(unknown)}"
    assert "musiq_queue_wait_seconds_bucket" in used
