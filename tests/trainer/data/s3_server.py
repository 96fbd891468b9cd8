"""Test helper: a moto S3 server behind a fault-injecting HTTP proxy, both in a child process on 127.0.0.1.

The reader under test talks only to the proxy. The proxy forwards to moto, except for requests that a plan
tells it to answer itself: S3-style XML errors (429 TooManyRequests, 503 SlowDown, 500, 403 AccessDenied), a
connection reset, or a stall. It logs every request it sees (arrival time, method, path, status, client
address) and the peak number of requests it was serving at once, so tests check rate, concurrency and retry
claims from the server's side rather than trusting the client's own counters.

Decisions:

* A separate process, so the proxy's arrival timestamps are not skewed by the client's threads holding the
  GIL; the parent drives it through `/__proxy__/...` control paths, which are never logged.
* A request counts as in flight at the proxy from arrival until just before its response is written. The
  client cannot have finished a request before that point, so the proxy's peak never overstates the
  client's concurrency. A stalled request stops counting when the stall starts: the client has given up.
* Run as a script it prints one JSON line with both ports and serves until stdin closes, so it dies with the
  test process.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOST = "127.0.0.1"
_CONTROL = "/__proxy__/"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"}
_ERRORS = {
    "403": (403, "AccessDenied", "Access Denied"),
    "429": (429, "TooManyRequests", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
ACTIONS = frozenset(_ERRORS) | {"reset", "stall"}


class _ProxyState:
    def __init__(self, moto_port: int) -> None:
        self.moto_port = moto_port
        self.lock = threading.Lock()
        self.reset({})

    def reset(self, plan: dict) -> None:
        with self.lock:
            # "METHOD /path" -> actions for the next matching requests, in order; then pass through.
            self.rules: dict[str, list[str]] = {k: list(v) for k, v in plan.get("rules", {}).items()}
            self.fault_fraction = float(plan.get("fault_fraction", 0.0))
            self.fault_actions = list(plan.get("fault_actions", ["429", "503"]))
            self.rng = random.Random(plan.get("seed", 0))
            self.latency_s = float(plan.get("latency_s", 0.0))
            self.stall_s = float(plan.get("stall_s", 2.0))
            self.log: list[dict] = []
            self.in_flight = 0
            self.max_concurrent = 0

    def arrive(self, method: str, path: str, client: str) -> tuple[dict, str | None]:
        with self.lock:
            entry = {"t": time.monotonic(), "method": method, "path": path, "client": client}
            self.log.append(entry)
            self.in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self.in_flight)
            queue = self.rules.get(f"{method} {path}")
            if queue:
                return entry, queue.pop(0)
            if self.fault_fraction and self.rng.random() < self.fault_fraction:
                return entry, self.rng.choice(self.fault_actions)
            return entry, None

    def depart(self, entry: dict, status: int | str) -> None:
        with self.lock:
            entry["status"] = status
            self.in_flight -= 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": list(self.log), "max_concurrent": self.max_concurrent}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real S3 clients expect
    server: _ProxyServer

    def log_message(self, format: str, *args: object) -> None:  # silence per-request stderr lines
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        state = self.server.state
        body = self._body()
        path = urlsplit(self.path).path
        if path.startswith(_CONTROL):
            return self._control(path.removeprefix(_CONTROL), body)
        entry, action = state.arrive(self.command, path, self.client_address[0])
        if action == "reset":
            state.depart(entry, "reset")
            # SO_LINGER 0 makes close() send an RST: the client sees a connection reset, not a clean EOF.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if action == "stall":
            state.depart(entry, "stall")
            time.sleep(state.stall_s)
            self.close_connection = True
            return
        if state.latency_s:
            time.sleep(state.latency_s)
        if action is not None:
            status, code, message = _ERRORS[action]
            xml = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{message}</Message><Resource>{path}</Resource></Error>"
            ).encode()
            state.depart(entry, status)
            return self._respond(status, [("Content-Type", "application/xml")], xml)
        status, headers, payload = self._forward(body)
        state.depart(entry, status)
        self._respond(status, headers, payload)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = HTTPConnection(HOST, self.server.state.moto_port, timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            if self.command == "HEAD":  # a HEAD reply states the object's length but carries no body
                kept.append(("Content-Length", response.getheader("Content-Length", "0")))
            return response.status, kept, payload
        finally:
            conn.close()

    def _respond(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _control(self, verb: str, body: bytes) -> None:
        state = self.server.state
        if verb == "reset":
            state.reset(json.loads(body or b"{}"))
            payload = b"{}"
        elif verb == "log":
            payload = json.dumps(state.snapshot()).encode()
        else:
            return self._respond(404, [], b"")
        self._respond(200, [("Content-Type", "application/json")], payload)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, moto_port: int) -> None:
        super().__init__((HOST, 0), _Handler)
        self.state = _ProxyState(moto_port)


def serve() -> None:
    """Child-process entry point: start moto and the proxy, print their ports, serve until stdin closes."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on the test's stderr
    moto = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
    moto.start()
    proxy = _ProxyServer(moto.get_host_and_port()[1])
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    print(json.dumps({"moto_port": moto.get_host_and_port()[1], "proxy_port": proxy.server_port}), flush=True)
    sys.stdin.read()


class S3Stack:
    """Parent-side handle on the child process: endpoints, fault plans and the proxy's request log."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"s3 test server exited with code {self._proc.wait()}")
        ports = json.loads(line)
        self.endpoint = f"http://{HOST}:{ports['proxy_port']}"
        self.moto_endpoint = f"http://{HOST}:{ports['moto_port']}"

    def plan(
        self,
        rules: dict[str, list[str]] | None = None,
        *,
        fault_fraction: float = 0.0,
        fault_actions: tuple[str, ...] = ("429", "503"),
        seed: int = 0,
        latency_s: float = 0.0,
        stall_s: float = 2.0,
    ) -> None:
        """Clear the log and set the faults: `rules` maps "GET /bucket/key" to the actions its next requests
        get, in order ("403", "429", "500", "503", "reset", "stall"); `fault_fraction` of other requests
        get a random one of `fault_actions`."""
        for action in [*(a for actions in (rules or {}).values() for a in actions), *fault_actions]:
            if action not in ACTIONS:
                raise ValueError(f"unknown proxy action {action!r}; expected one of {sorted(ACTIONS)}")
        plan = {
            "rules": rules or {},
            "fault_fraction": fault_fraction,
            "fault_actions": list(fault_actions),
            "seed": seed,
            "latency_s": latency_s,
            "stall_s": stall_s,
        }
        self._control("reset", json.dumps(plan).encode())

    def log(self) -> dict:
        """{"requests": [{"t", "method", "path", "client", "status"}, ...], "max_concurrent": int}."""
        return json.loads(self._control("log", None))

    def _control(self, verb: str, body: bytes | None) -> bytes:
        request = urllib.request.Request(f"{self.endpoint}{_CONTROL}{verb}", data=body, method="POST")
        # An empty ProxyHandler: a test machine's HTTP_PROXY setting must not reroute loopback traffic.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            return response.read()

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()

    def __enter__(self) -> S3Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    """The most timestamps that fall in any closed interval of `window_s` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


if __name__ == "__main__":
    serve()
