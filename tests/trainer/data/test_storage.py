"""MediaReader against a real S3-compatible server (moto, server mode) over HTTP on 127.0.0.1.

Every request goes through a fault-injecting proxy (s3_server.py, in a child process) that answers chosen
requests with S3-style 429 / 503 / 500 / 403 errors, resets or stalls, and logs what it saw; rate,
concurrency and retry claims are checked against that log, not only against the reader's own counters.
An audit hook records every socket connect and name lookup this process makes while the server is up, and
the AWS environment points at the proxy with dummy credentials, so the tests prove nothing but loopback
was contacted.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from s3_server import S3Stack, max_in_window

from trainer.data.storage import (
    MediaForbidden,
    MediaNotFound,
    MediaReader,
    MediaReadError,
    MediaUnavailable,
    StorageConfig,
)
from trainer.data.storage_errors import classify
from trainer.data.storage_limits import RateLimiter

BUCKET = "media"
N_OBJECTS = 24
LOOPBACK = "127.0.0.1"

# ---------------------------------------------------------------- network audit


_AUDIT: dict[str, object] = {"on": False, "seen": []}


def _audit_hook(event: str, args: tuple) -> None:
    if not _AUDIT["on"]:
        return
    if event == "socket.connect" and isinstance(args[1], tuple):  # AF_UNIX paths are not network peers
        _AUDIT["seen"].append(str(args[1][0]))
    elif event == "socket.getaddrinfo" and args[0] is not None:
        host = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        _AUDIT["seen"].append(host)


sys.addaudithook(_audit_hook)  # hooks cannot be removed; it records only while a stack fixture is up


@pytest.fixture(scope="module")
def stack():
    """The moto + proxy child process, a bucket of objects, and an AWS environment that can reach nothing
    else: dummy credentials, no config files, no instance metadata, no HTTP proxies, endpoint = proxy."""
    with S3Stack() as s3_stack, pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            mp.delenv(name, raising=False)
            mp.delenv(name.lower(), raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_ENDPOINT_URL", s3_stack.endpoint)
        mp.setenv("NO_PROXY", f"{LOOPBACK},localhost")
        _AUDIT["on"], _AUDIT["seen"] = True, []
        try:
            import boto3

            # Setup goes straight to moto, so the proxy's log holds only the reader's requests.
            s3 = boto3.client("s3", endpoint_url=s3_stack.moto_endpoint)
            s3.create_bucket(Bucket=BUCKET)
            rng = random.Random(0)
            objects = {f"img/{i:03d}.bin": rng.randbytes(rng.randint(1, 64 * 1024)) for i in range(N_OBJECTS)}
            for key, body in objects.items():
                s3.put_object(Bucket=BUCKET, Key=key, Body=body, ACL="public-read")
            yield Store(s3_stack, objects, s3)
            assert set(_AUDIT["seen"]) <= {LOOPBACK}, f"non-loopback network use: {set(_AUDIT['seen'])}"
        finally:
            _AUDIT["on"] = False


@dataclass
class Store:
    server: S3Stack
    objects: dict[str, bytes]  # key -> bytes, as put in BUCKET
    client: Any  # a boto3 client talking to moto directly

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def plan(self, rules: dict[str, list[str]] | None = None, **kwargs: Any) -> None:
        self.server.plan(rules, **kwargs)

    def log(self) -> dict:
        return self.server.log()


def s3_config(stack: Store, **overrides) -> StorageConfig:
    options = {"s3": {"endpoint_url": stack.endpoint, "config_kwargs": {"s3": {"addressing_style": "path"}}}}
    fields = dict(backoff_base_s=0.01, backoff_max_s=0.05, request_timeout_s=5.0, storage_options=options)
    return StorageConfig(**{**fields, **overrides})


def uri(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


def statuses(log: dict) -> Counter:
    return Counter(entry["status"] for entry in log["requests"])


def assert_proxy_saw_everything(reader: MediaReader, log: dict) -> None:
    assert reader.counters()["requests"] == len(log["requests"])
    assert {entry["client"] for entry in log["requests"]} <= {LOOPBACK}


# ---------------------------------------------------------------- s3 behaviour


def test_throttled_reads_succeed_under_the_rate_cap(stack):
    keys = sorted(stack.objects)[:16]
    # Per key, the proxy first answers 0, 1 or 2 times with 429 / 503 (S3 SlowDown) before passing through.
    scripts = [[], ["429"], ["503"], ["429", "503"]]
    rules = {f"GET /{BUCKET}/{k}": scripts[i % 4] for i, k in enumerate(keys)}
    stack.plan(rules)
    config = s3_config(stack, max_requests_per_second=20, max_in_flight=4, prefetch_threads=8, max_retries=4)
    with MediaReader(config, seed=0) as reader:
        items = list(reader.prefetch([uri(k) for k in keys]))
    assert [item.uri for item in items] == [uri(k) for k in keys]
    assert [item.unwrap() for item in items] == [stack.objects[k] for k in keys]

    log, counters = stack.log(), reader.counters()
    seen = statuses(log)
    injected = Counter(action for actions in rules.values() for action in actions)
    assert seen[429] == injected["429"] == counters["retries.http_429"] == 8
    assert seen[503] == injected["503"] == counters["retries.http_503"] == 8
    assert seen[200] == len(keys) and counters["failures"] == 0
    assert counters["bytes"] == sum(len(stack.objects[k]) for k in keys)
    assert_proxy_saw_everything(reader, log)
    # The server's clock: no 1-second window holds more than the cap (plus one: the limiter sends a request every
    # 1/19 s, and arrival jitter on a loaded machine once pulled a 21st into a closed 1-second window, with two
    # arrivals 49 ms apart), and the cap was what held us back.
    assert max_in_window([entry["t"] for entry in log["requests"]]) <= 20 + 1
    # Without the jitter: 0.9 s windows hold at most 18 requests at this pace.
    assert max_in_window([entry["t"] for entry in log["requests"]], window_s=0.9) <= 20
    assert counters["rate_limited_waits"] > 0
    assert log["max_concurrent"] <= 4


def test_concurrency_never_exceeds_max_in_flight(stack):
    keys = sorted(stack.objects)
    # 50 ms of server latency keeps requests overlapping; a quarter of them are throttled and retried.
    stack.plan(latency_s=0.05, fault_fraction=0.25, seed=1)
    config = s3_config(stack, max_in_flight=3, prefetch_threads=8, prefetch_depth=12, max_retries=10)
    with MediaReader(config, seed=0) as reader:
        data = [item.unwrap() for item in reader.prefetch([uri(k) for k in keys])]
    assert data == [stack.objects[k] for k in keys]
    log, counters = stack.log(), reader.counters()
    assert 2 <= log["max_concurrent"] <= 3
    assert counters["in_flight_peak"] <= 3
    assert counters["retries"] == statuses(log)[429] + statuses(log)[503] > 0
    assert_proxy_saw_everything(reader, log)


def test_not_found_and_forbidden_are_not_retried(stack):
    key = sorted(stack.objects)[0]
    stack.plan({f"GET /{BUCKET}/{key}": ["403"]})
    reader = MediaReader(s3_config(stack, max_retries=5))
    with pytest.raises(MediaNotFound, match="s3://media/img/missing.bin") as not_found:
        reader.read(uri("img/missing.bin"))
    with pytest.raises(MediaForbidden, match=f"s3://media/{key}"):
        reader.read(uri(key))
    with pytest.raises(MediaNotFound, match="s3://media/img/missing.bin"):
        reader.version(uri("img/missing.bin"))
    assert isinstance(not_found.value, ValueError)

    log = stack.log()
    seen = [(e["method"], e["path"], e["status"]) for e in log["requests"]]
    assert seen == [
        ("GET", f"/{BUCKET}/img/missing.bin", 404),
        ("GET", f"/{BUCKET}/{key}", 403),
        ("HEAD", f"/{BUCKET}/img/missing.bin", 404),
    ]
    counters = reader.counters()
    assert counters["retries"] == 0
    assert counters["failures.not_found"] == 2 and counters["failures.forbidden"] == 1
    assert_proxy_saw_everything(reader, log)


def test_retries_stop_at_max_retries_and_5xx_are_retried(stack):
    flaky, down = sorted(stack.objects)[:2]
    stack.plan({f"GET /{BUCKET}/{flaky}": ["500", "503"], f"GET /{BUCKET}/{down}": ["503"] * 10})
    reader = MediaReader(s3_config(stack, max_retries=2))
    assert reader.read(uri(flaky)) == stack.objects[flaky]
    with pytest.raises(MediaUnavailable, match=f"after 3 attempts: s3://media/{down}") as unavailable:
        reader.read(uri(down))
    assert not isinstance(unavailable.value, ValueError)  # the store's fault, not the sample's

    log, counters = stack.log(), reader.counters()
    # Exactly max_retries + 1 requests reached the server: neither botocore nor s3fs retried on their own.
    per_path = Counter(e["path"] for e in log["requests"])
    assert per_path == {f"/{BUCKET}/{flaky}": 3, f"/{BUCKET}/{down}": 3}
    assert counters["retries.http_500"] == 1 and counters["retries.http_503"] == 1 + 2
    assert counters["failures.exhausted"] == 1
    assert_proxy_saw_everything(reader, log)


def test_connection_resets_and_timeouts_are_retried(stack):
    warm, reset, stalled = sorted(stack.objects)[:3]
    stack.plan({f"GET /{BUCKET}/{reset}": ["reset"], f"GET /{BUCKET}/{stalled}": ["stall"]}, stall_s=1.5)
    reader = MediaReader(s3_config(stack, request_timeout_s=0.5, max_in_flight=1))
    # The first read leaves a keep-alive connection in the pool, so the reset hits a reused connection:
    # the case where aiohttp would otherwise re-send the request itself, unseen by our counters.
    assert reader.read(uri(warm)) == stack.objects[warm]
    assert reader.read(uri(reset)) == stack.objects[reset]
    assert reader.read(uri(stalled)) == stack.objects[stalled]

    log, counters = stack.log(), reader.counters()
    assert [e["status"] for e in log["requests"]] == [200, "reset", 200, "stall", 200]
    assert counters["retries.connection"] == 1 and counters["retries.timeout"] == 1
    assert counters["retries"] == 2
    assert_proxy_saw_everything(reader, log)


def test_prefetch_delivers_errors_with_their_items_in_order(stack):
    ok = sorted(stack.objects)[:3]
    stack.plan({f"GET /{BUCKET}/{ok[1]}": ["403"]})
    uris = [uri(ok[0]), uri("img/missing.bin"), uri(ok[1]), uri(ok[2])]
    with MediaReader(s3_config(stack, prefetch_depth=2, prefetch_threads=2)) as reader:
        items = list(reader.prefetch(uris))
    assert [item.uri for item in items] == uris
    assert items[0].data == stack.objects[ok[0]] and items[0].error is None
    assert isinstance(items[1].error, MediaNotFound) and items[1].data is None
    assert isinstance(items[2].error, MediaForbidden)
    assert items[3].unwrap() == stack.objects[ok[2]]
    with pytest.raises(MediaNotFound):
        items[1].unwrap()


def test_s3_version_is_the_etag_and_changes_with_the_object(stack):
    stack.plan()
    reader = MediaReader(s3_config(stack))
    key = "img/versioned.bin"
    stack.client.put_object(Bucket=BUCKET, Key=key, Body=b"first")
    first = reader.version(uri(key))
    assert first == f"etag:{hashlib.md5(b'first').hexdigest()}"  # moto, like S3, uses the MD5 for one part
    assert reader.version(uri(key)) == first
    stack.client.put_object(Bucket=BUCKET, Key=key, Body=b"second")
    assert reader.version(uri(key)) != first
    assert [e["method"] for e in stack.log()["requests"]] == ["HEAD"] * 3


def test_http_urls_are_read_with_the_same_rules(stack):
    key = sorted(stack.objects)[0]
    stack.plan({f"GET /{BUCKET}/{key}": ["429"]})
    reader = MediaReader(StorageConfig(backoff_base_s=0.01, backoff_max_s=0.05, max_requests_per_second=50))
    url = f"{stack.endpoint}/{BUCKET}/{key}"
    assert reader.read(url) == stack.objects[key]
    assert reader.version(url) == f"etag:{hashlib.md5(stack.objects[key]).hexdigest()}"
    with pytest.raises(MediaNotFound, match="missing.bin"):
        reader.read(f"{stack.endpoint}/{BUCKET}/img/missing.bin")
    log, counters = stack.log(), reader.counters()
    assert statuses(log) == {429: 1, 200: 2, 404: 1}
    assert counters["retries.http_429"] == 1 and counters["retries"] == 1
    assert_proxy_saw_everything(reader, log)


# ---------------------------------------------------------------- local files


def test_local_paths_and_file_urls(tmp_path: Path):
    path = tmp_path / "a b.jpg"
    path.write_bytes(b"\xff\xd8 jpeg bytes")
    reader = MediaReader()
    assert reader.read(path) == reader.read(str(path)) == reader.read(path.as_uri()) == b"\xff\xd8 jpeg bytes"
    assert reader.read(f"file://{path}") == path.read_bytes()
    assert reader.counters()["bytes"] == 4 * len(path.read_bytes())


def test_local_version_is_mtime_and_size(tmp_path: Path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"12345")
    os.utime(path, ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_001))
    reader = MediaReader()
    assert reader.version(path) == "mtime_ns:1700000000000000001:size:5"
    assert reader.version(path.as_uri()) == reader.version(path)
    os.utime(path, ns=(1_700_000_000_000_000_002, 1_700_000_000_000_000_002))
    assert reader.version(path) == "mtime_ns:1700000000000000002:size:5"


def test_local_errors_name_the_file_and_are_not_retried(tmp_path: Path):
    reader = MediaReader(StorageConfig(max_retries=3))
    with pytest.raises(MediaNotFound, match="nope.png"):
        reader.read(tmp_path / "nope.png")
    with pytest.raises(MediaReadError, match=str(tmp_path)):
        reader.read(tmp_path)  # a directory
    with pytest.raises(MediaReadError, match="chained"):
        reader.read(f"simplecache::file://{tmp_path}/x")
    counters = reader.counters()
    assert counters["requests"] == 2 and counters["retries"] == 0 and counters["failures"] == 2


def test_reader_pickles_as_its_config():
    reader = MediaReader(StorageConfig(max_in_flight=3, storage_options={"s3": {"endpoint_url": "http://x"}}))
    reader.read(__file__)
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.config == reader.config
    assert copy.counters()["requests"] == 0


# ---------------------------------------------------------------- units: config, limiter, classification


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_requests_per_second": 0}, "max_requests_per_second"),
        ({"max_requests_per_second": 2, "rate_burst": 2}, "max_requests_per_second"),
        ({"backoff_base_s": 1.0, "backoff_max_s": 0.5}, "backoff_max_s"),
        ({"request_timeout_s": float("nan")}, "request_timeout_s"),
        ({"prefetch_depth": 0}, "prefetch_depth"),
        ({"storage_options": {"s3": "http://x"}}, "storage_options"),
        ({"storage_options": {"s3": {"secret": "hunter2"}}}, "secret"),
        ({"storage_options": {"s3": {"key": "AKIA..."}}}, "'key'"),
        (
            {"storage_options": {"s3": {"client_kwargs": {"aws_secret_access_key": "x"}}}},
            "aws_secret_access_key",
        ),
        ({"storage_options": {"http": {"headers": {"Authorization": "Bearer x"}}}}, "Authorization"),
        ({"storage_options": {"s3": {"config_kwargs": {"retries": {"max_attempts": 9}}}}}, "retries"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        StorageConfig(**overrides)


def test_config_accepts_references_to_credentials():
    config = StorageConfig(storage_options={"s3": {"profile": "training", "endpoint_url": "http://x"}})
    assert config.options_for("s3a") == {"profile": "training", "endpoint_url": "http://x"}


def test_rate_limiter_never_grants_more_than_the_rate_in_any_second():
    now = [0.0]
    grants = []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    for burst in (1, 5):
        limiter = RateLimiter(20, burst, clock=lambda: now[0], sleep=sleep)
        for i in range(200):
            if i % 37 == 0:
                now[0] += 3.0  # a lull refills the bucket: the burst that follows must still fit
            limiter.acquire()
            grants.append(now[0])
        assert max_in_window(grants) <= 20
        grants.clear()


def _client_error(status: int, code: str) -> ClientError:
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "GetObject")


def test_classify_sorts_failures_by_what_retrying_can_fix():
    wrapped = OSError("s3fs wrapped it")
    wrapped.__cause__ = _client_error(429, "TooManyRequests")
    assert classify(_client_error(503, "SlowDown")) == "http_503"
    assert classify(_client_error(502, "BadGateway")) == "http_502"
    assert classify(wrapped) == "http_429"
    assert classify(_client_error(400, "ThrottlingException")) == "throttled"
    assert classify(_client_error(404, "404")) == "not_found"
    assert classify(_client_error(403, "AccessDenied")) == "forbidden"
    assert classify(_client_error(400, "InvalidRequest")) == "error"
    assert classify(ConnectionResetError()) == "connection"
    assert classify(TimeoutError()) == "timeout"
    assert classify(FileNotFoundError("x")) == "not_found"
    assert classify(TypeError("a bug")) == "unexpected"
