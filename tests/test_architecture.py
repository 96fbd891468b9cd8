"""The layout's rules, checked: every import-linter contract holds and fails when a forbidden import is planted
(in a temporary copy), its list of trainer modules is complete, and the CLI's modules import each other without
a cycle (function-level imports included)."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "controller", "k8s", "cli")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# contract id -> (module file to plant in, the forbidden import planted)
PLANTS = {
    "control-plane-uses-only-the-contract": ("controller/goodput.py", "import trainer.train"),
    "control-plane-without-torch": ("cli/output.py", "import torch"),
    "controller-without-kubernetes": ("controller/reconciler.py", "import kubernetes"),
    "trainer-is-independent": ("trainer/faults.py", "import sqlalchemy"),
    "layers": ("k8s/crd.py", "import cli.output"),
    "controller-layers": ("controller/store/repo.py", "import controller.states"),
    "decisions-are-pure": ("controller/hangs.py", "import controller.store.models"),
    "contract-is-self-contained": ("trainer/contract/memory.py", "import trainer.runtime"),
}


def _contracts() -> dict[str, configparser.SectionProxy]:
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    prefix = "importlinter:contract:"
    return {name.removeprefix(prefix): config[name] for name in config.sections() if name.startswith(prefix)}


def _lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the copy's packages, not the editable install's, are the ones analysed.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the four packages and the contracts, without caches."""
    root = tmp_path_factory.mktemp("layout")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", root / ".importlinter")
    return root


def test_every_contract_is_planted_once() -> None:
    assert sorted(PLANTS) == sorted(_contracts())


def test_the_contracts_hold(pristine: Path) -> None:
    done = _lint(pristine)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"Contracts: {len(PLANTS)} kept, 0 broken." in done.stdout


@pytest.mark.parametrize("contract", sorted(PLANTS))
def test_a_forbidden_import_breaks_its_contract(contract: str, pristine: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(pristine, root)
    module, line = PLANTS[contract]
    with open(root / module, "a") as f:
        f.write(f"\n{line}  # planted by tests/test_architecture.py\n")
    done = _lint(root)
    assert done.returncode != 0, done.stdout[-3000:]
    name = " ".join(_contracts()[contract]["name"].split())
    broken = " ".join(done.stdout.split())  # the report folds long names over lines
    assert f"{name} BROKEN" in broken, done.stdout[-3000:]


def test_the_contract_package_forbids_every_other_trainer_module() -> None:
    """A module added to trainer/ must join the list, or trainer.contract could import it unnoticed."""
    forbidden = set(_contracts()["contract-is-self-contained"]["forbidden_modules"].split())
    modules = {
        f"trainer.{p.stem if p.suffix == '.py' else p.name}"
        for p in (REPO / "trainer").iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()
    }
    assert modules - {"trainer.contract"} <= forbidden, sorted(modules - forbidden - {"trainer.contract"})


def test_printing_help_loads_neither_the_store_nor_the_cluster_client() -> None:
    """`vlctl --help` imports every command module: each keeps its heavy imports inside its commands."""
    heavy = ("sqlalchemy", "alembic", "kubernetes", "numpy", "yaml", "controller.spec", "controller.store")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cli.main import app\n"
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_listing_jobs_reads_core_tables_without_the_orm(tmp_path: Path) -> None:
    """`vlctl list` on a store at the newest schema reads the Core tables (controller/store/tables.py): neither
    the ORM nor Alembic is imported, and the rows it prints are the jobs the store holds."""
    url = f"sqlite:///{tmp_path / 'vlctl.db'}"
    setup = (
        "import sys\n"
        "from controller.store import migrate, open_store, StoreConfig, create_job\n"
        "store = open_store(StoreConfig(url=sys.argv[1]))\n"
        "migrate.upgrade(store)\n"
        "with store.transaction() as session:\n"
        "    create_job(session=session, name='listed', spec={'backend': 'local'})\n"
        "store.dispose()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", setup, url], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cli.main import app\n"
        "result = CliRunner().invoke(app, ['list', '-o', 'json'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "print(sorted(m for m in ('sqlalchemy.orm', 'alembic', 'controller.store.models') if m in sys.modules))\n"
    )
    env = {**os.environ, "VLCTL_DATABASE_URL": url}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )
    assert done.returncode == 0, done.stderr
    *listing, loaded = done.stdout.strip().splitlines()
    assert loaded == "[]"
    assert [job["name"] for job in json.loads("\n".join(listing))] == ["listed"]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cli_has_no_import_cycle() -> None:
    graph = grimp.build_graph("cli", cache_dir=None)
    edges = {
        m: {i for i in graph.find_modules_directly_imported_by(m) if i.startswith("cli.")}
        for m in graph.modules
    }
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
