"""The dashboard's JSON API and its security, over a real uvicorn server on SQLite and PostgreSQL (issue 15).

The browser side (real Chromium) is tests/controller/test_dashboard_browser.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from bench.stored_jobs import SCRIPT, store_hostile_job, store_large_job
from controller.dashboard import DashboardConfig, DashboardServer
from controller.store import StoreConfig, open_store
from controller.store.migrate import upgrade
from controller.views import read_job_views

REPO = Path(__file__).resolve().parents[2]
TOKEN = "t0k3n-for-the-dashboard-tests"


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture
def served(migrated_store, tmp_path: Path) -> Iterator[tuple[DashboardServer, object]]:
    store_hostile_job(migrated_store, tmp_path / "run")
    server = DashboardServer(migrated_store).start()
    try:
        yield server, migrated_store
    finally:
        server.stop()


def test_the_api_gives_the_read_model_and_the_page_its_own_documents(served) -> None:
    server, store = served
    status, headers, body = get(server.url + "api/jobs")
    assert status == 200 and headers["content-type"] == "application/json"
    with store.read() as session:
        (view,) = read_job_views(session, ranks=False)
    # One view, two renderings: the jobs document is `vlctl list -o json`'s.
    assert json.loads(body) == [json.loads(json.dumps(view.as_dict(ranks=False)))]
    assert json.loads(get(server.url + "api/jobs?phase=succeeded")[2]) == []
    status, _, body = get(server.url + "api/jobs?phase=bogus")
    assert status == 400 and b"phase" in body

    job = json.loads(get(server.url + "api/jobs/hostile")[2])
    assert job["name"] == "hostile" and job["phase"] == "running" and job["num_ranks"] == 2
    assert [r["rank"] for r in job["ranks"]] == [0, 1] and job["ranks"][1]["flagged"]
    assert job["ranks"][1]["straggler"] == {
        "cause": "compute",
        "phase": "backward",
        "slowdown": 1.4,
        "step": 9,
    }
    assert job["ranks"][0]["straggler"] is None
    assert [e["reason"] for e in job["events"]] == ["Submitted", "Crash", "StragglerFlagged"] and job[
        "attempts"
    ][0]["number"] == 1
    assert get(server.url + "api/jobs/missing")[0] == 404

    steps = json.loads(get(server.url + "api/jobs/hostile/steps")[2])
    assert [p["step"] for p in steps["points"]] == list(range(10))
    assert steps["points"][0]["loss"] == 3.0 and steps["points"][0]["tokens_per_second"] == 640 / 0.5 * 2
    again = json.loads(get(server.url + f"api/jobs/hostile/steps?offset={steps['offset']}")[2])
    assert again["points"] == [] and again["offset"] == steps["offset"]  # a live page fetches only new lines
    assert get(server.url + "api/jobs/hostile/steps?offset=-1")[0] == 400

    status, headers, body = get(server.url)
    assert status == 200 and b"dashboard.js" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    status, _, body = get(server.url + "static/plotly.min.js")
    assert status == 200 and len(body) > 1_000_000  # served from the plotly package: no CDN


def test_a_16384_rank_job_is_summarised_by_node(migrated_store, tmp_path: Path) -> None:
    store_large_job(migrated_store, tmp_path / "run", ranks=16_384, windows=3)
    server = DashboardServer(migrated_store).start()
    try:
        status, _, body = get(server.url + "api/jobs/large")
        job = json.loads(body)
        assert status == 200 and job["num_ranks"] == 16_384
        assert len(job["ranks"]) == 32 and len(job["nodes_summary"]) == 64
        assert job["nodes_summary"][0]["node"] == "node-1024" and job["nodes_summary"][0]["flagged"] == 8
        assert all(r["flagged"] for r in job["ranks"][:8])
        assert len(body) < 200_000  # not 16,384 rows
        heat = json.loads(get(server.url + "api/jobs/large/heatmap")[2])
        # A row for the median of every node, then the 64 nodes worth a look: the flagged one first.
        assert heat["by"] == "node" and heat["num_rows"] == 2048 and heat["windows"] == [20, 25, 30]
        assert heat["rows"][:2] == ["median of 2048 nodes", "node-1024"] and len(heat["rows"]) == 65
        assert heat["own_work_s"][0] == [0.9, 0.9, 0.9] and heat["own_work_s"][1] == [1.3, 1.3, 1.3]
        assert {heat["rows"][c["row"]] for c in heat["flagged"]} == {"node-1024"}
        assert [c["ranks"] for c in heat["flagged"]] == [8]  # window 30: the node's 8 ranks
    finally:
        server.stop()


def test_a_token_guards_every_request(migrated_store, tmp_path: Path) -> None:
    store_hostile_job(migrated_store, tmp_path / "run")
    server = DashboardServer(migrated_store, config=DashboardConfig(token=TOKEN)).start()
    try:
        for path in ("", "api/jobs", "api/jobs/hostile", "static/dashboard.js", "static/plotly.min.js"):
            status, headers, _ = get(server.url + path)
            assert status == 401 and headers["www-authenticate"].startswith("Bearer"), path
        assert (
            get(server.url + "api/jobs", {"Authorization": "Bearer wrong-token-of-the-same-size!"})[0] == 401
        )
        assert get(server.url + "api/jobs", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        # A first visit with ?token= sets an HttpOnly cookie that carries it afterwards.
        status, headers, _ = get(server.url + f"?token={TOKEN}")
        cookie = headers["set-cookie"]
        assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert get(server.url + "api/jobs", {"Cookie": cookie.split(";")[0]})[0] == 200
    finally:
        server.stop()


def test_serving_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    env = {"VLCTL_DATABASE_URL": f"sqlite:///{tmp_path / 's.db'}", "PATH": "/usr/bin:/bin"}
    vlctl = [sys.executable, "-m", "cli"]
    # Bound to every address with a token: a request without it is 401, with it 200.
    proc = subprocess.Popen([*vlctl, "ui", "--host", "0.0.0.0", "--port", "0"], cwd=REPO,
                            env={**env, "VLCTL_UI_TOKEN": TOKEN}, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = proc.stderr.readline()
        assert "dashboard on http://0.0.0.0:" in line and TOKEN not in line, line
        url = "http://127.0.0.1:" + line.split("0.0.0.0:")[1].split("/")[0] + "/"
        assert get(url + "api/jobs")[0] == 401 and get(url)[0] == 401
        assert get(url + "api/jobs", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then (recent releases) lets the signal end the process as it would have.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    # Without one it does not start.
    out = subprocess.run([*vlctl, "ui", "--host", "0.0.0.0", "--port", "0"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "needs --token" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([*vlctl, "ui", "--token", "short"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 2 and "--token" in out.stderr


def test_no_response_holds_the_database_password(postgres_only_url: str, tmp_path: Path) -> None:
    # Trust authentication takes any password: the URL carries one, and nothing the dashboard answers may.
    password = "pw-that-must-not-leak-7731"
    url = make_url(postgres_only_url).set(password=password).render_as_string(hide_password=False)
    store = open_store(StoreConfig(url=url))
    try:
        upgrade(store)
        store_hostile_job(store, tmp_path / "run")
        server = DashboardServer(store).start()
        try:
            for path in ("", "api/jobs", "api/jobs/hostile", "api/jobs/hostile/steps", "api/jobs/hostile/heatmap",
                         "api/jobs/missing", "api/jobs?phase=bogus", "api/settings"):  # fmt: skip
                status, headers, body = get(server.url + path)
                assert password.encode() not in body and password not in json.dumps(headers), path
        finally:
            server.stop()
    finally:
        store.dispose()


def test_markup_from_a_job_stays_data(served) -> None:
    # The API returns the strings as they are (JSON); the page puts them in with textContent (the browser test
    # checks the rendering). Here: they come back unchanged and the page's script never assigns innerHTML.
    server, _ = served
    job = json.loads(get(server.url + "api/jobs/hostile")[2])
    assert (
        job["message"] == SCRIPT
        and job["events"][1]["message"] == SCRIPT
        and job["ranks"][0]["node"] == SCRIPT
    )
    script = (REPO / "controller" / "dashboard" / "static" / "dashboard.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script
