"""Claim: `vlctl --help` and `vlctl list` (an empty SQLite store at the current schema) each take at most 0.35 s
of CPU, median of 5 runs, against `python -c pass` measured in the same run.

CPU time (user + system of the child process, from `resource.getrusage(RUSAGE_CHILDREN)`) rather than wall
time: it is what the command itself costs, and it moves much less than wall time on a shared machine. Each
repetition runs the three commands in turn, interleaved, so a busy moment hits all of them alike. The store is
created (and brought to the newest schema) once before the measured runs, as a user's store is after the first
command, and that first run writes the project's bytecode caches as any installation has them
(PYTHONDONTWRITEBYTECODE, set on some machines, is cleared for the children: without the caches every run
would compile the CLI's modules again).

    .venv/bin/python -m bench.bench_cli_startup [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LIMIT_SECONDS = 0.35
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "vlctl --help": [sys.executable, "-m", "cli", "--help"],
    "vlctl list": [sys.executable, "-m", "cli", "list"],
    # Not judged; what `list` is made of: SQLAlchemy Core, which it imports, and the ORM, which it no longer does
    # (controller/store/tables.py). The GC is off as in the CLI (cli/process.py).
    "import sqlalchemy": [sys.executable, "-c", "import gc; gc.disable(); import sqlalchemy"],
    "import sqlalchemy.orm": [sys.executable, "-c", "import gc; gc.disable(); import sqlalchemy.orm"],
}


def cpu_seconds(argv: list[str], env: dict[str, str]) -> float:
    """User + system CPU time of one run of `argv` (which must succeed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    reps = 3 if args.quick else args.reps
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "VLCTL_DATABASE_URL": f"sqlite:///{Path(tmp) / 'vlctl.db'}",
            "VLCTL_BACKEND": "local",
            "COLUMNS": "100",
        }
        env.pop("VLCTL_DEBUG", None)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for argv_ in COMMANDS.values():  # warm: .pyc files written, the store created at the newest schema
            cpu_seconds(argv_, env)
        times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for _ in range(reps):
            for name, argv_ in COMMANDS.items():
                times[name].append(cpu_seconds(argv_, env))
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["python -c pass"]
    result = {
        "reps": reps,
        "limit_seconds": LIMIT_SECONDS,
        "python_pass_cpu_s": round(base, 4),
        "help_cpu_s": round(medians["vlctl --help"], 4),
        "list_cpu_s": round(medians["vlctl list"], 4),
        "help_ratio": round(medians["vlctl --help"] / base, 1) if base else None,
        "list_ratio": round(medians["vlctl list"] / base, 1) if base else None,
        "within_limit": medians["vlctl --help"] <= LIMIT_SECONDS and medians["vlctl list"] <= LIMIT_SECONDS,
        "sqlalchemy_core_import_cpu_s": round(medians["import sqlalchemy"], 4),
        "sqlalchemy_orm_import_cpu_s": round(medians["import sqlalchemy.orm"], 4),
        "runs": {name: [round(v, 4) for v in values] for name, values in times.items()},
    }
    # `ratio`: the slower command over the interpreter's bare start, as every bench reports one.
    result["ratio"] = max(result["help_ratio"] or 0, result["list_ratio"] or 0)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(main(sys.argv[1:]), indent=2))
