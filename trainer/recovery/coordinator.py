"""The job's recovery coordinator: `python -m trainer.recovery.coordinator --world-size N --state-file F`.

One process per attempt, started by the launcher beside the ranks. It hosts the job's recovery store (a TCPStore:
the rounds, the spares' assignments, what the ranks report back) and serves a small HTTP API through which the
controller, which never imports torch, replaces lost ranks:

- `GET /v1/status`: the current round, the world size, the spares waiting, every round's replaced ranks and
  assignments with the times the ranks reported (joined the round, resumed from which step), and the committed
  snapshot step.
- `POST /v1/replace` `{"ranks": [r, ...], "failed_round": k[, "members": [m, ...]]}`: opens round k + 1 with a
  waiting spare in each lost rank's place (the given members, in rank order, or any that wait). Idempotent: a second request for the same failed round (a restarted controller) answers the
  round already opened. 409 when fewer spares wait than ranks were lost (the launcher starts more; ask again).

When it is listening it writes `--state-file` (JSON: pid, store and HTTP addresses) by rename, so a reader never
sees half of it.

Store keys (regroup.py's protocol, plus what the ranks report):
  round-<k>/open (world size), round-<k>/replaced (JSON list), current (k), assign/<member> ("k:rank"): written
  here only. spares (a counter) and spare/<i> (JSON {member, pid}): a spare registering. round-<k>/joined/<rank>,
  round-<k>/resumed/<rank> (JSON {time[, step]}), committed (the committed snapshot step): the ranks.

Decisions:

- A process of its own, not a rank's store: the store must outlive any rank or node (torchrun's own store lives in
  node 0's agent and dies with it).
- The controller decides which ranks are lost (it sees process exits and hangs); the coordinator only turns that
  into a round. Ranks cannot reliably tell a dead peer from a slow one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch.distributed as dist

from trainer.recovery import regroup

log = logging.getLogger("trainer.recovery.coordinator")

CURRENT = "current"
SPARES = "spares"
COMMITTED = "committed"


def replaced_key(round_: int) -> str:
    return regroup.round_prefix(round_) + "replaced"


def report_key(round_: int, what: str, rank: int) -> str:
    """round-<k>/<joined|resumed>/<rank>: written by the rank."""
    return f"{regroup.round_prefix(round_)}{what}/{rank}"


def spare_key(index: int) -> str:
    return f"spare/{index}"


class NotEnoughSpares(RuntimeError):
    pass


class Coordinator:
    """The rounds of one attempt, on its store (the store's own server lives in this process)."""

    def __init__(self, store: dist.Store, world_size: int):
        self.store, self.world_size = store, world_size
        self._lock = threading.Lock()
        self.round = 0
        self.rounds: list[dict[str, Any]] = []
        self._assigned: set[str] = set()
        self._failed: dict[int, int] = {}  # failed round -> the round opened for it
        self._open(0, replaced={}, assignments={})

    def _open(self, round_: int, *, replaced: dict[int, str], assignments: dict[str, int]) -> None:
        self.store.set(replaced_key(round_), json.dumps(sorted(replaced)))
        # `current` before the round opens: a survivor that wakes on round-k/open reads it at once (written after,
        # a survivor read the old round here and went back to its dead peers' addresses).
        self.store.set(CURRENT, str(round_))
        regroup.open_round(self.store, round_, world_size=self.world_size, assignments=assignments)
        self.round = round_
        self.rounds.append(
            {
                "round": round_,
                "replaced": sorted(replaced),
                "assignments": assignments,
                "opened_at": time.time(),
            }
        )

    def waiting_spares(self) -> list[dict[str, Any]]:
        count = int(self.store.add(SPARES, 0))
        spares = []
        for index in range(count):
            key = spare_key(index)
            if not self.store.check([key]):
                continue  # counted, not written yet
            spare = json.loads(self.store.get(key))
            if spare["member"] not in self._assigned:
                spares.append(spare)
        return spares

    def replace(
        self, ranks: list[int], *, failed_round: int, members: list[str] | None = None
    ) -> dict[str, Any]:
        with self._lock:
            if failed_round in self._failed:  # asked again (a restarted controller): the same answer
                return self.rounds[self._failed[failed_round]]
            if failed_round != self.round:
                raise ValueError(f"failed_round: {failed_round}, but the current round is {self.round}")
            if bad := [r for r in ranks if not 0 <= r < self.world_size]:
                raise ValueError(f"ranks: {bad} outside the world of {self.world_size}")
            waiting = [s["member"] for s in self.waiting_spares()]
            lost = sorted(set(ranks))
            if members is not None:  # the caller's choice (a whole spare node for a lost node, in rank order)
                if len(members) != len(lost) or (missing := [m for m in members if m not in waiting]):
                    raise NotEnoughSpares(
                        f"members: {len(members)} for {len(lost)} ranks"
                        if len(members) != len(lost)
                        else f"members {missing} are not waiting"
                    )
                waiting = list(members)
            if len(waiting) < len(lost):
                raise NotEnoughSpares(f"{len(lost)} ranks lost, {len(waiting)} spares waiting")
            chosen = dict(zip(lost, waiting, strict=False))
            self._assigned.update(chosen.values())
            self._open(
                self.round + 1, replaced=chosen, assignments={member: rank for rank, member in chosen.items()}
            )
            self._failed[failed_round] = self.round
            return self.rounds[-1]

    def status(self) -> dict[str, Any]:
        with self._lock:
            rounds = []
            for info in self.rounds:
                k = info["round"]
                reports: dict[str, dict[str, Any]] = {"joined": {}, "resumed": {}}
                for what, found in reports.items():
                    for rank in range(self.world_size):
                        key = report_key(k, what, rank)
                        if self.store.check([key]):
                            found[str(rank)] = json.loads(self.store.get(key))
                rounds.append({**info, **reports})
            committed = int(self.store.get(COMMITTED)) if self.store.check([COMMITTED]) else None
            return {
                "round": self.round,
                "world_size": self.world_size,
                "spares_waiting": [s["member"] for s in self.waiting_spares()],
                "committed_step": committed,
                "rounds": rounds,
            }


def _handler(coordinator: Coordinator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("%s " + format, self.address_string(), *args)

        def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path != "/v1/status":
                return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})
            self._reply(HTTPStatus.OK, coordinator.status())

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/v1/replace":
                return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path: {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                ranks, failed_round = body["ranks"], body["failed_round"]
                if not isinstance(ranks, list) or not all(isinstance(r, int) for r in ranks) or not ranks:
                    raise ValueError("ranks: a non-empty list of integers")
                if not isinstance(failed_round, int):
                    raise ValueError("failed_round: an integer")
                members = body.get("members")
                if members is not None and (
                    not isinstance(members, list) or not all(isinstance(m, str) for m in members)
                ):
                    raise ValueError("members: a list of spare member ids")
                self._reply(
                    HTTPStatus.OK, coordinator.replace(ranks, failed_round=failed_round, members=members)
                )
            except NotEnoughSpares as err:
                self._reply(HTTPStatus.CONFLICT, {"error": str(err)})
            except (KeyError, ValueError, json.JSONDecodeError) as err:
                self._reply(HTTPStatus.BAD_REQUEST, {"error": f"{type(err).__name__}: {err}"})

    return Handler


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.recovery.coordinator", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--state-file", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="where the store and the HTTP API listen")
    parser.add_argument("--store-port", type=int, default=0)
    parser.add_argument("--http-port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [coordinator] %(message)s")
    if args.world_size < 1:
        print(f"error: --world-size: must be >= 1, got {args.world_size}", file=sys.stderr)
        return 2
    store = dist.TCPStore(
        args.host, args.store_port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    coordinator = Coordinator(store, args.world_size)
    server = ThreadingHTTPServer((args.host, args.http_port), _handler(coordinator))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    _write_state(
        args.state_file,
        {
            "pid": os.getpid(),
            "store": f"{args.host}:{store.port}",
            "url": f"http://{args.host}:{server.server_address[1]}",
        },
    )
    log.info("store on %s:%d, API on port %d", args.host, store.port, server.server_address[1])
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
