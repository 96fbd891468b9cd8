"""`make bench`: run every bench/bench_*.py in turn and print one JSON line per benchmark.

Each module's `main(argv)` measures its claim against a baseline in the same process and returns a dict of
results (including `ratio`). `python -m bench NAME ...` runs only the named ones; `--quick` asks each for a
smaller run.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    wanted = [a for a in argv if not a.startswith("-")]
    names = sorted(
        m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_")
    )
    for name in names:
        if wanted and name not in wanted and name.removeprefix("bench_") not in wanted:
            continue
        module = importlib.import_module(f"bench.{name}")
        print(f"== {name}", file=sys.stderr, flush=True)
        result = module.main(["--quick"] if quick else [])
        print(json.dumps({"bench": name, **(result or {})}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
