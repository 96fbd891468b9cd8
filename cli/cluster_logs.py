"""`vlctl logs` against a Kubernetes cluster: the logs of a TrainingJob attempt's pods (one per node), read
once or followed.

Decisions:

- `logs` reads the attempt's pods (labels vlctl.dev/job and vlctl.dev/attempt), one per node. `--rank R` reads
  the pod of node R // procs_per_node and keeps the lines torchrun prefixed with that rank (`[rank3]:`,
  `[3]:`, or `--tee`'s `[default1]:` by local rank), or the whole pod when its log carries no such prefix.
- `--follow` streams every started pod, picks up pods that start later and, unless `--attempt` pins one, the
  next attempt's pods after a restart; it returns once the job has ended and its streams are done.
- Connection, errors and exit codes are cli/cluster_api.py's; the calls go through k8s/api.py's `KubeApi`, as
  the operator's do. The job is read as its view (k8s.status.view_from_object), as `vlctl status` reads it.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import typer

from controller.domain.phases import TERMINAL_PHASES
from k8s import render as manifests
from k8s.api import api_message, one_line
from k8s.status import view_from_object

from .client import LogRequest
from .cluster_api import Cluster, api_call, connect, get_job, job_or_none
from .errors import CliError
from .options import Target
from .output import OutputFormat, emit, stderr

# torchrun's line prefixes: the global rank (`[rank3]:` or the template `[${rank}]:`), or `--tee`'s default
# `[${role_name}${local_rank}]:` with the default role.
_GLOBAL_PREFIX = re.compile(r"^\[(?:rank)?(\d+)\]:\s?")
_LOCAL_PREFIX = re.compile(r"^\[default(\d+)\]:\s?")
FOLLOW_POLL_SECONDS = 1.0  # how often `logs --follow` looks for pods that started, and for a new attempt


@dataclass(kw_only=True)
class PodLog:
    """One node's pod, and the rank whose lines to keep (None: every line)."""

    pod: dict[str, Any]
    index: int
    rank: int | None
    procs_per_node: int
    prefixed: bool = False  # a rank-prefixed line has been seen in this pod's log

    @property
    def name(self) -> str:
        return self.pod["metadata"]["name"]

    def rank_of(self, line: str) -> tuple[int, str] | None:
        if m := _GLOBAL_PREFIX.match(line):
            return int(m[1]), line[m.end() :]
        if m := _LOCAL_PREFIX.match(line):
            return self.index * self.procs_per_node + int(m[1]), line[m.end() :]
        return None

    def keep(self, lines: list[str]) -> list[str]:
        """The lines of `rank`, unprefixed; every line while the log has shown no prefix at all."""
        if self.rank is None:
            return lines
        parsed = [(line, self.rank_of(line)) for line in lines]
        self.prefixed = self.prefixed or any(p is not None for _, p in parsed)
        if not self.prefixed:
            return lines
        return [p[1] for _, p in parsed if p is not None and p[0] == self.rank]


def _started(pod: Mapping[str, Any]) -> bool:
    """A container ran or runs, so the kubelet has a log to serve."""
    status = pod.get("status") or {}
    states = [c.get("state") or {} for c in status.get("containerStatuses") or []]
    return any("running" in s or "terminated" in s for s in states)


def _attempt_pods(cl: Cluster, name: str, attempt: int) -> list[dict[str, Any]]:
    selector = manifests.attempt_selector(name, attempt)
    with api_call(cl, "list", "pods"):
        listed = cl.kube.list("Pod", cl.namespace, selector)
    pods = [p for p in listed if manifests.LABEL_NODE_INDEX in (p["metadata"].get("labels") or {})]
    return sorted(pods, key=lambda p: int(p["metadata"]["labels"][manifests.LABEL_NODE_INDEX]))


def _select(
    pods: list[dict[str, Any]], *, rank: int | None, node: str | None, procs_per_node: int
) -> list[PodLog]:
    chosen = []
    for pod in pods:
        index = int(pod["metadata"]["labels"][manifests.LABEL_NODE_INDEX])
        names = {str(index), f"n{index}", pod["metadata"]["name"], (pod.get("spec") or {}).get("nodeName")}
        if rank is not None and index != rank // procs_per_node:
            continue
        if node is not None and node not in names:
            continue
        chosen.append(PodLog(pod=pod, index=index, rank=rank, procs_per_node=procs_per_node))
    return chosen


def _read(cl: Cluster, log: PodLog, tail: int | None) -> list[str] | None:
    """The pod's log (its last `tail` lines), or None with a note when the kubelet has none to give yet."""
    with api_call(cl, "get", "pods/log", log.name):
        try:
            text = cl.kube.pod_log(
                cl.namespace, log.name, manifests.CONTAINER_NAME, tail_lines=tail, limit_bytes=None
            )
        except Exception as err:  # 400: the container waits to start; 404: the pod just went
            if getattr(err, "status", None) not in (400, 404):
                raise
            why = api_message(err)
            stderr.print(f"pod {log.name}: no log to show ({why})", markup=False, highlight=False)
            return None
    return text.splitlines()


def _write(lines: list[str], prefix: str) -> None:
    if lines:
        typer.echo("".join(f"{prefix}{line}\n" for line in lines), nl=False)


def logs(
    where: Target,
    name: str,
    request: LogRequest,
) -> None:
    """The last lines of the job's pods (one per node), or of one rank's or node's."""
    rank, node, attempt, follow, lines, output = (
        request.rank, request.node, request.attempt, request.follow, request.lines, request.output
    )  # fmt: skip
    poll_seconds = FOLLOW_POLL_SECONDS  # read at each call: tests shorten it
    if follow and output is OutputFormat.json:
        raise CliError("--follow: not with --output json, which prints a single document")
    if rank is not None and node is not None:
        raise CliError("--rank, --node: give one or the other")
    cl = connect(where)
    view = view_from_object(get_job(cl, name))
    current, procs = int(view.attempt or 0), int(view.procs_per_node or 1)
    if current == 0:
        raise CliError(f"logs: job {name!r} has never been launched, so it has no logs yet")
    number = current if attempt is None else attempt
    if number > current:
        raise CliError(f"--attempt: job {name!r} has attempts 1 to {current}")
    world = int(view.nodes or 1) * procs
    if rank is not None and rank >= world:
        raise CliError(f"--rank: job {name!r} has ranks 0 to {world - 1}")
    selected = _select(_attempt_pods(cl, name, number), rank=rank, node=node, procs_per_node=procs)
    if not selected and not follow:
        what = f"rank {rank}" if rank is not None else f"node {node}" if node is not None else "any node"
        raise CliError(
            f"logs: no pod of {what} for attempt {number} of job {name!r} (gone, or not created yet)"
        )
    prefixed = rank is None and node is None
    if follow:
        _follow(
            cl,
            name,
            number,
            selected,
            pinned=attempt is not None,
            rank=rank,
            node=node,
            tail=lines,
            procs=procs,
            poll_seconds=poll_seconds,
        )
        return
    data = []
    for log in selected:
        # A rank's lines are picked out of the whole log, so its last `lines` are found however the ranks mix.
        text = _read(cl, log, None if rank is not None else lines) or []
        kept = log.keep(text)[-lines:] if lines else []
        if rank is not None and not log.prefixed and text:
            stderr.print(
                f"pod {log.name}: no rank prefixes in its log; showing node {log.index}'s whole log "
                f"(ranks {log.index * procs} to {log.index * procs + procs - 1})",
                markup=False,
                highlight=False,
            )
        data.append(
            {
                "attempt": number,
                "node_index": log.index,
                "pod": log.name,
                "node": (log.pod.get("spec") or {}).get("nodeName"),
                "rank": rank if log.prefixed else None,
                "lines": kept,
            }
        )
    if output is OutputFormat.json:
        emit(data, output, str)
        return
    for row in data:
        _write(row["lines"], f"[node {row['node_index']}] " if prefixed else "")


def _stream(cl: Cluster, log: PodLog, tail: int | None, out: queue.Queue) -> None:
    """Put (uid, lines) on `out` as they come, (uid, a note) if the stream breaks, then (uid, None) at its end."""
    uid = log.pod["metadata"]["uid"]
    try:
        response = cl.kube.follow_pod_log(cl.namespace, log.name, manifests.CONTAINER_NAME, tail_lines=tail)
        pending = b""
        for chunk in response.stream(4096, decode_content=True):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            if complete:
                out.put((uid, [c.decode("utf-8", errors="replace") for c in complete]))
        if pending:
            out.put((uid, [pending.decode("utf-8", errors="replace")]))
    except Exception as err:  # noqa: BLE001 - reported, and the pod counts as done
        why = api_message(err) if hasattr(err, "status") else one_line(str(err))
        out.put((uid, f"pod {log.name}: its log stream broke ({why[:200]})"))
    finally:
        out.put((uid, None))


def _follow(
    cl: Cluster,
    name: str,
    attempt: int,
    selected: list[PodLog],
    *,
    pinned: bool,
    rank: int | None,
    node: str | None,
    tail: int,
    procs: int,
    poll_seconds: float,
) -> None:
    """Stream every started pod of the attempt; pods that start later join. Once no stream is open, a new attempt
    (unless pinned) is followed from its first lines; an ended or deleted job returns after one more look for
    pods that started and ended between two polls."""
    prefixed = rank is None and node is None
    out: queue.Queue = queue.Queue()
    following: dict[str, PodLog] = {}  # uid -> its stream is open
    done: set[str] = set()
    pods, ending = selected, False
    first_tail: int | None = (
        tail * procs if rank is not None else tail
    )  # a rank's share of the last lines, about
    while True:
        started = 0
        for log in pods:
            uid = log.pod["metadata"]["uid"]
            if uid not in following and uid not in done and _started(log.pod):
                following[uid] = log
                threading.Thread(target=_stream, args=(cl, log, first_tail, out), daemon=True).start()
                started += 1
        deadline = time.monotonic() + poll_seconds
        while following and (left := deadline - time.monotonic()) > 0:
            try:
                uid, got = out.get(timeout=left)
            except queue.Empty:
                break
            if got is None:
                done.add(uid)
                following.pop(uid, None)
            elif isinstance(got, str):
                stderr.print(got, markup=False, highlight=False)
            else:
                log = following[uid]
                _write(log.keep(got), f"[node {log.index}] " if prefixed else "")
        if not following:
            if ending and not started:
                return
            obj = job_or_none(cl, name)
            if obj is None:
                stderr.print(f"TrainingJob {name} was deleted", markup=False, highlight=False)
                return
            now = view_from_object(obj)
            if not pinned and now.attempt > attempt:
                attempt, done, first_tail, ending = now.attempt, set(), None, False
                stderr.print(f"--- attempt {attempt} ---", markup=False, highlight=False)
            elif now.phase in TERMINAL_PHASES or (now.cluster is not None and now.cluster.deleted):
                ending = True
            else:
                time.sleep(poll_seconds)
        pods = _select(_attempt_pods(cl, name, attempt), rank=rank, node=node, procs_per_node=procs)
