"""The recovery coordinator's rounds and HTTP API, on a real TCPStore (no training processes)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from datetime import timedelta
from http.server import ThreadingHTTPServer

import pytest
import torch.distributed as dist

from trainer.recovery import regroup
from trainer.recovery.coordinator import CURRENT, SPARES, Coordinator, _handler, replaced_key, spare_key


@pytest.fixture
def served():
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)
    )
    coordinator = Coordinator(store, world_size=4)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(coordinator))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield store, coordinator, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _call(url: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _register(store: dist.Store, member: str) -> None:
    index = int(store.add(SPARES, 1)) - 1
    store.set(spare_key(index), json.dumps({"member": member, "pid": 1}))


def test_round_0_is_open_for_the_whole_world_at_start(served) -> None:
    store, _, url = served
    assert regroup.wait_for_round(store, 0, timeout_s=1) == 4
    assert store.get(CURRENT) == b"0" and json.loads(store.get(replaced_key(0))) == []
    code, status = _call(url + "/v1/status")
    assert (
        code == 200 and status["round"] == 0 and status["spares_waiting"] == [] and status["world_size"] == 4
    )


def test_replace_assigns_waiting_spares_once_and_answers_a_repeat_with_the_same_round(served) -> None:
    store, _, url = served
    code, body = _call(url + "/v1/replace", {"ranks": [2, 3], "failed_round": 0})
    assert code == 409 and "2 ranks lost, 0 spares waiting" in body["error"]
    _register(store, "s0")
    _register(store, "s1")
    _register(store, "s2")
    code, opened = _call(url + "/v1/replace", {"ranks": [3, 2], "failed_round": 0})
    assert code == 200 and opened["round"] == 1 and opened["assignments"] == {"s0": 2, "s1": 3}
    assert regroup.wait_for_assignment(store, "s1", timeout_s=1) == (1, 3)
    assert json.loads(store.get(replaced_key(1))) == [2, 3] and store.get(CURRENT) == b"1"
    assert _call(url + "/v1/replace", {"ranks": [2, 3], "failed_round": 0}) == (200, opened)
    code, status = _call(url + "/v1/status")
    assert status["round"] == 1 and status["spares_waiting"] == ["s2"]
    # Named members: they must be waiting (s0 and s1 were given ranks already).
    code, body = _call(url + "/v1/replace", {"ranks": [0], "failed_round": 1, "members": ["s0"]})
    assert code == 409 and "not waiting" in body["error"]
    code, opened = _call(url + "/v1/replace", {"ranks": [0], "failed_round": 1, "members": ["s2"]})
    assert code == 200 and opened["round"] == 2 and opened["assignments"] == {"s2": 0}
    # A failure in a round that is not the current one is refused (its ranks were replaced already).
    code, body = _call(url + "/v1/replace", {"ranks": [1], "failed_round": 5})
    assert code == 400 and "current round is 2" in body["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "JSONDecodeError"),
        ({"failed_round": 0}, "'ranks'"),
        ({"ranks": [], "failed_round": 0}, "ranks: a non-empty list"),
        ({"ranks": ["1"], "failed_round": 0}, "ranks: a non-empty list"),
        ({"ranks": [7], "failed_round": 0}, "outside the world of 4"),
        ({"ranks": [1], "failed_round": "0"}, "failed_round: an integer"),
        ({"ranks": [1], "failed_round": 0, "members": "s0"}, "members: a list"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field(served, body, message: str) -> None:
    _, _, url = served
    code, reply = _call(url + "/v1/replace", body)
    assert code == 400 and message in reply["error"]


def test_unknown_paths_are_404(served) -> None:
    _, _, url = served
    assert _call(url + "/v1/nothing")[0] == 404
    assert _call(url + "/v1/nothing", {"x": 1})[0] == 404
