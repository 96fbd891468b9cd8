"""The alert rules and the Grafana dashboard, checked statically against the exporters' metric lists and live
against a real Prometheus server that scrapes a real 2-rank training run and the controller's exporter.

The live test starts, side by side: a 2-rank CPU training under torchrun (its ranks serve the trainer's metrics
on fixed ports), the controller's exporter over a SQLite store filled by `populate_store` (tests/controller/
test_metrics.py: restarts, failures, a flagged straggler, a stale checkpoint, a low ETTR, a failed job), and
/usr/bin/prometheus scraping both every second with the PrometheusRule's groups as its rule file. Every PromQL
expression of the dashboard and the rules must then be accepted and return data.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from controller.metrics import METRICS as CONTROLLER_METRICS
from trainer.contract.telemetry import METRICS as TRAINER_METRICS

REPO = Path(__file__).resolve().parents[2]
RULES_FILE = REPO / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
DASHBOARD_FILE = REPO / "k8s" / "base" / "monitoring" / "grafana-dashboard.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

# Alerts the populated store makes true, and those that must stay quiet (for which the expression without its
# final threshold comparison has to return data instead).
FIRING = {
    "VlctlStragglerFlagged": "rank 3 of vl-train is flagged",
    "VlctlRestartBudgetNearlySpent": "4 counted restarts of max_restarts 5",
    "VlctlCheckpointStale": "step 900, newest checkpoint at step 200, interval 50",
    "VlctlEttrLow": "ETTR 0.6 after 85 minutes of wall time",
    "VlctlJobFailed": "vl-broken failed ten minutes ago",
}
QUIET = {
    "VlctlJobHung": "the live training makes progress every second",
    "VlctlControllerStoreDown": "the exporter reads its store",
    "VlctlCheckpointStorageUnavailable": "the live training's saves commit",
}
NOT_JOB_SPECIFIC = {"VlctlControllerStoreDown"}
# Grafana's variables, as a dashboard viewer would have them for the live run (1 s scrape interval).
GRAFANA_VARIABLES = {
    "$training_job": "vl-train",
    "$__rate_interval": "5s",
    "$__interval": "1s",
    "$__range": "1m",
}
_THRESHOLD = re.compile(r"^(?P<lhs>.*\S)\s*(?:>=|<=|==|!=|>|<)\s*[0-9.]+\s*$", re.DOTALL)


def rule_groups() -> list[dict[str, Any]]:
    """The PrometheusRule's spec.groups: a plain Prometheus rules file's `groups`."""
    doc = yaml.safe_load(RULES_FILE.read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    return doc["spec"]["groups"]


def alert_rules() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rule_groups() for rule in group["rules"] if "alert" in rule}


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query in the dashboard, rows' nested panels included."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            out += [(p["title"], t["expr"]) for t in p.get("targets", []) if t.get("expr")]
    return out


def substitute(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unsubstituted Grafana variable in {expr!r}"
    return expr


def known_sample_names() -> set[str]:
    names = {m.name for m in TRAINER_METRICS}
    for spec in CONTROLLER_METRICS:
        names.update(spec.sample_names)
    return names


# ---------------------------------------------------------------------------------------------- static checks


def test_every_metric_in_the_rules_and_the_dashboard_is_exported() -> None:
    known = known_sample_names()
    expressions = [(f"alert {name}", rule["expr"]) for name, rule in alert_rules().items()]
    expressions += [(f"panel {title!r}", expr) for title, expr in dashboard_targets()]
    assert len(expressions) > 30
    for where, expr in expressions:
        used = set(re.findall(r"\bvlctl_[a-z0-9_]+", expr))
        assert used, f"{where}: no vlctl metric in {expr!r}"
        assert used <= known, (
            f"{where}: {sorted(used - known)} exported by neither the trainer nor the controller"
        )
        # Prometheus sets `job` and `instance` at scrape time; our series never carry them as their own.
        assert not re.search(r"\b(job|instance)\s*(=|!=|=~|!~|[,)])", expr), f"{where}: uses job/instance"


def test_alerts_have_severity_and_annotations_naming_the_job() -> None:
    rules = alert_rules()
    assert set(rules) == set(FIRING) | set(QUIET)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        for annotation in ("summary", "description"):
            text = rule["annotations"][annotation]
            if name not in NOT_JOB_SPECIFIC:
                assert "{{ $labels.training_job }}" in text, f"{name}: {annotation} does not name the job"
    metadata = yaml.safe_load(RULES_FILE.read_text())["metadata"]
    assert metadata["namespace"] == "vlctl-system"
    assert {"prometheus", "role", "release"} <= set(metadata["labels"])


def test_dashboard_variables_and_panels() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["training_job"]["definition"] == "label_values(vlctl_trainer_step, training_job)"
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    exprs = " ".join(expr for _, expr in dashboard_targets())
    for metric in (
        "vlctl_trainer_step_seconds",
        "vlctl_trainer_own_work_seconds",
        "vlctl_trainer_phase_seconds",
        "vlctl_trainer_sync_wait_seconds",
        "vlctl_trainer_text_tokens_total",
        "vlctl_trainer_vision_tokens_total",
        "vlctl_trainer_mfu",
        "vlctl_trainer_loss",
        "vlctl_trainer_checkpoint_seconds",
        "vlctl_controller_restarts_total",
        "vlctl_controller_job_ettr",
        "vlctl_controller_job_lost_seconds",
        "vlctl_controller_job_last_checkpoint_step",
        "vlctl_controller_rank_straggler_score",
    ):
        assert metric in exprs, f"no panel shows {metric}"
    assert any(p["type"] == "heatmap" for p in dashboard["panels"])


def test_docs_list_every_metric_and_alert() -> None:
    docs = (REPO / "docs" / "monitoring.md").read_text()
    names = [m.name for m in TRAINER_METRICS] + [m.name for m in CONTROLLER_METRICS] + list(alert_rules())
    assert not [name for name in names if f"`{name}`" not in docs]


# ---------------------------------------------------------------------------------------------- live check


def _free_port(count: int = 1) -> int:
    """The first of `count` consecutive free ports on 127.0.0.1."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


class Prometheus:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of an instant query, POSTed so long expressions fit."""
        body = urllib.parse.urlencode({"query": expr}).encode()
        try:
            with urllib.request.urlopen(f"{self.base}/api/v1/query", data=body, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process we started and every process below it, by pid (torchrun leaves ranks otherwise)."""
    if proc.poll() is not None:
        return
    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=10)
    proc.wait(timeout=10)


def _write_prometheus_config(folder: Path, *, trainer_port: int, controller_port: int) -> Path:
    rules = folder / "vlctl-rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "vlctl-trainer",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{trainer_port}", f"127.0.0.1:{trainer_port + 1}"]}
                ],
            },
            {
                "job_name": "vlctl-controller",
                "static_configs": [{"targets": [f"127.0.0.1:{controller_port}"]}],
            },
        ],
    }
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_rules_and_dashboard_against_a_real_prometheus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path(PROMETHEUS).exists():
        reason = f"no Prometheus binary at {PROMETHEUS} (make venv installs Debian's prometheus package)"
        if os.environ.get("VLCTL_REQUIRE_PROMETHEUS") == "1":  # CI: a missing server fails the run
            pytest.fail(reason)
        pytest.skip(reason)
    monkeypatch.syspath_prepend(REPO / "tests" / "trainer")
    monkeypatch.syspath_prepend(REPO / "tests" / "controller")
    from test_metrics import TRAIN_JOB, populate_store
    from train_harness import make_data, torchrun_background, write_config

    from controller.metrics import serve_metrics
    from controller.store import StoreConfig, open_store
    from controller.store.migrate import upgrade
    from controller.store.tables import utcnow

    assert GRAFANA_VARIABLES["$training_job"] == TRAIN_JOB
    store = open_store(StoreConfig(url=f"sqlite:///{tmp_path / 'vlctl.db'}"))
    upgrade(store)
    populate_store(store, utcnow())
    server, server_thread = serve_metrics(store, "127.0.0.1", 0)

    trainer_port = _free_port(2)
    config = write_config(
        tmp_path / "train.yaml",
        make_data(tmp_path / "synthetic"),
        tmp_path / "run",
        training={"steps": 500},  # far more than the test watches: the run is killed once checked
        checkpoint={"interval_steps": 3},  # stage and save times appear within the first steps
        parallel={"dp": 2},
        telemetry={"base_port": trainer_port},
    )
    prometheus_port = _free_port()
    prometheus_config = _write_prometheus_config(
        tmp_path, trainer_port=trainer_port, controller_port=server.server_port
    )
    training = prometheus = None
    try:
        training = torchrun_background(
            config,
            2,
            env={"VLCTL_TRAINING_JOB": TRAIN_JOB, "VLCTL_NODE": "node-a"},
            log=tmp_path / "train.log",
        )
        prometheus_log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115 - closed with the process
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={prometheus_config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
            stdout=prometheus_log,
            stderr=subprocess.STDOUT,
        )
        prom = Prometheus(prometheus_port)
        deadline = time.monotonic() + 30
        while not prom.ready():
            assert prometheus.poll() is None, (
                f"Prometheus exited: {(tmp_path / 'prometheus.log').read_text()}"
            )
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.2)

        # A broken expression is refused: the check below is not vacuous.
        status, body = prom.query("max by (training_job (vlctl_trainer_step)")
        assert (status, body["errorType"]) == (400, "bad_data")

        rules = alert_rules()
        probes = {
            f"panel {title!r} query {i}": substitute(expr)
            for i, (title, expr) in enumerate(dashboard_targets())
        }
        for name, rule in rules.items():
            if name in FIRING:
                probes[f"alert {name} (fires: {FIRING[name]})"] = rule["expr"]
            else:
                match = _THRESHOLD.match(rule["expr"])
                assert match, f"{name}: quiet alerts end in a threshold comparison, got {rule['expr']!r}"
                probes[f"alert {name} without its threshold ({QUIET[name]})"] = match["lhs"]

        # Poll until every expression returns data: the trainer's series appear as its ranks start stepping,
        # rates once two scrapes are in.
        empty = dict(probes)
        deadline = time.monotonic() + 120
        while empty and time.monotonic() < deadline:
            assert training.poll() is None, f"training exited: {(tmp_path / 'train.log').read_text()[-3000:]}"
            for where, expr in list(empty.items()):
                status, body = prom.query(expr)
                assert status == 200, f"{where}: Prometheus refused {expr!r}: {body.get('error')}"
                if body["data"]["result"]:
                    del empty[where]
            time.sleep(1)
        print(f"{len(probes)} expressions return data after {time.monotonic() - deadline + 120:.0f} s")
        assert not empty, "no data for:\n" + "\n".join(f"{w}: {e}" for w, e in empty.items())

        # Every rule loads and evaluates cleanly; the alerts meant to fire are pending or firing, the others not.
        expected = {name: name in FIRING for name in rules}
        deadline = time.monotonic() + 30
        while True:
            loaded = {
                rule["name"]: rule
                for group in prom.get("/api/v1/rules", type="alert")["data"]["groups"]
                for rule in group["rules"]
            }
            active = {name: rule["state"] != "inactive" for name, rule in loaded.items()}
            if active == expected or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert set(loaded) == set(rules)
        for name, rule in loaded.items():
            assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        assert active == expected
        assert loaded["VlctlJobFailed"]["state"] == "firing"  # no `for`: fires on the first evaluation
        firing_jobs = {a["labels"]["training_job"] for a in loaded["VlctlJobFailed"]["alerts"]}
        assert firing_jobs == {"vl-broken"}
    finally:
        for proc in (training, prometheus):
            if proc is not None:
                _kill_tree(proc)
        server.shutdown()
        server.server_close()
        server_thread.join(timeout=5)
        store.dispose()
