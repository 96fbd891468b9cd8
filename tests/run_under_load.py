"""Run the timing-dependent tests (marker `timing`, see tests/conftest.py) several times in a row while two CPU
hogs keep both cores busy, as on a loaded CI machine: `make test-load` (REPEAT=5 by default).

    python tests/run_under_load.py --repeat 5 [-- extra pytest arguments]

Stops at the first run that fails; the hogs are always stopped. Prints one line per run and exits non-zero when a
run failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOG = "while True: pass"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("REPEAT", "5")))
    parser.add_argument(
        "--hogs", type=int, default=os.cpu_count() or 2, help="busy processes (default: cores)"
    )
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    try:
        for run in range(1, args.repeat + 1):
            started = time.monotonic()
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-m",
                    "timing",
                    "-p",
                    "no:cacheprovider",
                    *args.pytest_args,
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            tail = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
            print(
                f"run {run}/{args.repeat} next to {args.hogs} CPU hogs: {tail[0]} "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )
            if done.returncode != 0:
                print(done.stdout[-20000:], file=sys.stderr)
                return 1
        return 0
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
