"""Backends of MediaReader: one attempt at reading a whole object, or its version, per call; no retries.

The reader wraps every call in its own limits and retries (storage.py), so a backend must make exactly one
attempt and let failures escape.

Decisions:

* s3 goes through s3fs (session, the AWS credential chain, endpoint_url, fsspec URL rules), but each call is
  a single request made with s3fs's aiobotocore client: GetObject for read, HeadObject for version. s3fs's
  own calls would add requests we cannot count or pace (`info` falls back to ListObjectsV2 on a miss,
  `cat_file` may HEAD first) and sleep inside its retry wrapper even with retries=1. The client itself is
  built with botocore retries off (total_max_attempts=1) and a connection pool as large as max_in_flight.
  boto3 behind an adapter was the alternative; s3fs/aiobotocore installed cleanly next to our torch, and
  sharing s3fs's session keeps the s3 options the same as anywhere else fsspec is used.
* aiohttp re-sends an idempotent request once, silently, when a reused keep-alive connection drops before
  the answer (RFC 9112 section 9.3.1). That resend reaches the server uncounted and unpaced, so both the s3
  client (through aiobotocore's `http_session_cls` hook) and fsspec's HTTP filesystem (its `get_client`
  hook) get sessions with it switched off; the reader retries such a drop itself as "connection". The
  switch is a private aiohttp attribute: where it is missing there is no resend to switch off, and the
  reset tests in tests/trainer/data/test_storage.py fail if aiohttp ever renames it. The same session class
  opens its connection pool when the client is built (see S3Backend.__init__).
* Any other fsspec protocol (http(s), gcs, az, ...) uses the filesystem's `cat_file` and `info`. Async
  filesystems get the per-attempt timeout by cancelling the coroutine; synchronous ones rely on their own
  timeouts. fsspec's HTTP filesystem does not retry; other filesystems' built-in retries are not turned off
  here and may issue more than one request per call.
* Local paths and file:// are read with plain file I/O; their version is mtime in nanoseconds plus size.
  file:// URLs are percent-decoded as RFC 8089 says; plain paths are used as given.
"""

from __future__ import annotations

import os
from typing import Any, Protocol
from urllib.parse import urlsplit
from urllib.request import url2pathname

import fsspec
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.implementations.local import LocalFileSystem

from trainer.data.storage_config import StorageConfig

LOCAL_PROTOCOLS = frozenset({"file", "local"})
_ETAG_KEYS = ("ETag", "etag", "Etag", "e_tag")
_MTIME_KEYS = ("mtime", "LastModified", "Last-Modified", "last_modified", "updated", "modified")


class Backend(Protocol):
    remote: bool  # subject to the request-rate cap

    def read(self, uri: str) -> bytes: ...

    def version(self, uri: str) -> str: ...


def local_path(uri: str) -> str:
    """A local path or file:// URL as a path. file:// URLs are percent-decoded (RFC 8089, as Path.as_uri()
    writes them); plain paths are taken literally."""
    if uri.startswith("file://"):
        return url2pathname(urlsplit(uri).path)
    return LocalFileSystem._strip_protocol(uri)


class LocalBackend:
    remote = False

    def read(self, uri: str) -> bytes:
        with open(local_path(uri), "rb") as f:
            return f.read()

    def version(self, uri: str) -> str:
        st = os.stat(local_path(uri))
        return f"mtime_ns:{st.st_mtime_ns}:size:{st.st_size}"


def _without_resend(session: Any) -> Any:
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session


async def _http_client(**kwargs: Any) -> Any:
    import aiohttp

    return _without_resend(aiohttp.ClientSession(**kwargs))


class FsspecBackend:
    remote = True

    def __init__(self, protocol: str, config: StorageConfig) -> None:
        options = config.options_for(protocol)
        if protocol in ("http", "https"):
            options.setdefault("get_client", _http_client)
        self._fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        self._async = isinstance(self._fs, AsyncFileSystem)
        self._timeout = config.request_timeout_s

    def _run(self, name: str, path: str) -> Any:
        if self._async:
            # sync() wraps the coroutine in asyncio.wait_for, which cancels it on timeout (FSTimeoutError).
            return sync(self._fs.loop, getattr(self._fs, f"_{name}"), path, timeout=self._timeout)
        return getattr(self._fs, name)(path)

    def read(self, uri: str) -> bytes:
        return self._run("cat_file", self._fs._strip_protocol(uri))

    def version(self, uri: str) -> str:
        info = self._run("info", self._fs._strip_protocol(uri))
        etag = next((info[k] for k in _ETAG_KEYS if info.get(k)), None)
        if etag is not None:
            return f"etag:{str(etag).strip(chr(34))}"
        mtime = next((info[k] for k in _MTIME_KEYS if info.get(k)), None)
        if mtime is None or info.get("size") is None:
            raise OSError(f"{uri}: the store reports neither an ETag nor a modification time and size")
        return f"mtime:{mtime}:size:{info['size']}"


class S3Backend:
    remote = True

    def __init__(self, protocol: str, config: StorageConfig) -> None:
        from aiobotocore.httpsession import AIOHTTPSession
        from s3fs import S3FileSystem

        class _NoResendSession(AIOHTTPSession):
            async def __aenter__(self) -> Any:
                await super().__aenter__()
                await self._get_session(None)  # build the pool (and SSL context) now; see __init__ below
                return self

            async def _get_session(self, proxy_url: str | None) -> Any:
                return _without_resend(await super()._get_session(proxy_url))

        options = config.options_for(protocol)
        client_config = dict(options.pop("config_kwargs", {}))
        client_config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
        client_config["http_session_cls"] = _NoResendSession
        client_config.setdefault("max_pool_connections", config.max_in_flight)
        if config.request_timeout_s is not None:
            client_config.setdefault("connect_timeout", config.request_timeout_s)
            client_config.setdefault("read_timeout", config.request_timeout_s)
        self._fs = S3FileSystem(config_kwargs=client_config, skip_instance_cache=True, **options)
        self._fs.retries = 1  # a class attribute in s3fs, not an argument; we bypass its wrapper anyway
        self._timeout = config.request_timeout_s
        # Client and connection pool are built now, not on first use: the reader has already taken a rate
        # token when it calls read(), and requests queued behind a slow lazy set-up (loading the service
        # model, building the SSL context) would reach the server in a burst above the cap.
        self._client = sync(self._fs.loop, self._fs.set_session)

    def _call(self, coro_fn, uri: str) -> Any:
        bucket, key, version_id = self._fs.split_path(uri)
        if not bucket or not key:
            raise IsADirectoryError(f"{uri} names a bucket, not an object")
        extra = {"VersionId": version_id} if version_id else {}
        return sync(self._fs.loop, coro_fn, self._client, bucket, key, extra, timeout=self._timeout)

    def read(self, uri: str) -> bytes:
        return self._call(_get_object, uri)

    def version(self, uri: str) -> str:
        return f"etag:{self._call(_head_object, uri)}"


async def _get_object(client: Any, bucket: str, key: str, extra: dict[str, str]) -> bytes:
    response = await client.get_object(Bucket=bucket, Key=key, **extra)
    body = response["Body"]
    try:
        return await body.read()
    finally:
        body.close()


async def _head_object(client: Any, bucket: str, key: str, extra: dict[str, str]) -> str:
    response = await client.head_object(Bucket=bucket, Key=key, **extra)
    return response["ETag"].strip('"')


def make_backend(protocol: str | None, config: StorageConfig) -> Backend:
    if protocol is None or protocol in LOCAL_PROTOCOLS:
        return LocalBackend()
    if protocol in ("s3", "s3a"):
        return S3Backend(protocol, config)
    return FsspecBackend(protocol, config)
