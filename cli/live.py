"""The live view of one job (`vlctl run`, `vlctl demo`): step, loss, tokens/s, ETA, restarts, stragglers, drawn
from the job's view (controller/views.py) after every reconcile pass."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from controller.store.session import Store
    from controller.views import JobView


def job_snapshot(db: Store, name: str) -> JobView:
    """The job's view, read in one transaction."""
    from controller.store.repo import get_job
    from controller.views import read_job_view

    with db.read() as session:
        return read_job_view(session, get_job(session=session, name=name))


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render_snapshot(v: JobView) -> Group:
    step = f"{_fmt(v.step)}/{_fmt(v.total_steps)}"
    eta = "-" if (seconds := v.eta_seconds) is None else f"{seconds / 60:.1f} min"
    ettr = "-" if v.ettr is None else f"{v.ettr:.0%}"
    checkpoint = None if v.last_checkpoint is None else v.last_checkpoint.step
    head = Text(
        f"{v.name}  {v.phase}  attempt {v.attempt}  step {step}  loss {_fmt(v.loss, '.3f')}  "
        f"{_fmt(v.tokens_per_second, ',.0f')} tok/s  ETA {eta}  restarts {v.restarts}  "
        f"checkpoint {_fmt(checkpoint)}  ETTR {ettr}"
    )
    table = Table(box=None, pad_edge=False)
    for column in ("rank", "node", "pid", "step", "own work s", "score", "straggler"):
        table.add_column(column)
    for r in v.ranks or ():
        table.add_row(
            str(r.rank),
            r.node,
            _fmt(r.pid),
            _fmt(r.step),
            _fmt(r.own_work_s, ".3f"),
            _fmt(r.straggler_score, ".1f"),
            "FLAGGED" if r.flagged else "",
        )
    return Group(head, table)
