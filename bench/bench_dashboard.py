"""Claim (issue 15): a stored 16,384-rank job's dashboard page loads in <= 2 s in a real browser, against a
2-rank job's page in the same run (the ratio says what the job's size costs over the page's own start).

A store filled by bench.stored_jobs (16,384 ranks, 8 a node; rank rows, 4 straggler windows, 20 events, 100
steps of rank 0), `vlctl ui`'s server in this process, Debian's Chromium driven by Playwright. Load time: from
navigation to the node heatmap and the rank tables drawn (what the page shows last), measured in the browser's
own clock (performance.now()). Cold: a new browser context each time (nothing cached: plotly.js is fetched and
compiled again); warm: a second visit in the same context (the HTTP cache holds plotly.js and the script, as
for a user who keeps the page open or comes back). Medians of `--reps` (5; `--quick` 3). Also the API's
answers' sizes and server times.

    .venv/bin/python -m bench bench_dashboard [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.stored_jobs import store_hostile_job, store_large_job
from controller.dashboard import DashboardServer
from controller.store import StoreConfig, open_store
from controller.store.migrate import upgrade

# The heatmap's note is written in the same task that draws it (or says there are no windows yet).
DRAWN = """() => {
  const note = document.getElementById('heatmap-note');
  return note && note.textContent.length > 0 && document.querySelectorAll('#ranks table tbody tr').length > 0;
}"""


def _load(context: Any, url: str) -> float:
    page = context.new_page()
    try:
        page.goto(url, wait_until="commit")
        page.wait_for_function(DRAWN, polling="raf", timeout=60_000)
        # Navigation start to now, in the page's clock.
        return page.evaluate("() => performance.now()") / 1000
    finally:
        page.close()


def _api(url: str) -> dict[str, Any]:
    out = {}
    for name in ("", "/heatmap", "/steps"):
        started = time.perf_counter()
        body = urllib.request.urlopen(url + name, timeout=60).read()
        out[name.strip("/") or "job"] = {
            "bytes": len(body),
            "seconds": round(time.perf_counter() - started, 3),
        }
    return out


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    reps = 3 if args.quick else args.reps
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("bench_dashboard: no chromium on PATH (`make venv` installs Debian's)")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="vlctl-bench-ui-") as tmp:
        store = open_store(StoreConfig(url=f"sqlite:///{Path(tmp) / 'vlctl.db'}"))
        upgrade(store)
        store_large_job(store, Path(tmp) / "large", ranks=16_384, windows=4)
        store_hostile_job(store, Path(tmp) / "small", name="small")
        server = DashboardServer(store).start()
        try:
            api = _api(server.url + "api/jobs/large")
            cold: dict[str, list[float]] = {"large": [], "small": []}
            warm: dict[str, list[float]] = {"large": [], "small": []}
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                try:
                    for _ in range(reps):
                        for job in ("small", "large"):  # interleaved: the machine's speed drifts
                            context = browser.new_context(viewport={"width": 1400, "height": 1000})
                            try:
                                cold[job].append(_load(context, server.url + f"jobs/{job}"))
                                warm[job].append(_load(context, server.url + f"jobs/{job}"))
                            finally:
                                context.close()
                finally:
                    browser.close()
        finally:
            server.stop()
            store.dispose()
    med = {f"{kind}_{job}_s": round(statistics.median(v), 2) for kind, d in (("cold", cold), ("warm", warm))
           for job, v in d.items()}  # fmt: skip
    return {
        "ranks": 16_384,
        "reps": reps,
        **med,
        "cold_large_all_s": [round(x, 2) for x in cold["large"]],
        "api": api,
        "ratio": round(med["cold_large_s"] / med["cold_small_s"], 2),
        "goals": {"cold_within_2s": med["cold_large_s"] <= 2.0, "warm_within_2s": med["warm_large_s"] <= 2.0},
    }
