"""Decoded-video cache on local disk, shared by every data-loader process on a machine.

Video decoding is the slow part of the vision pipeline (the Qwen2-VL paper names it the main bottleneck and
solved it with caching decoding). An entry holds one video's sampled frames after the resize, as uint8
(n, H, W, 3), keyed by the video's URI, its content version (ETag, or mtime and size for a local file: the
caller passes it) and the settings that decide which frames and what size (`params`).

Decisions:

* What is stored: resized uint8 frames. That is the smallest faithful form: a quarter of the normalised
  float32 pixels and smaller than the native frames, normalising and patchifying it again costs a few
  milliseconds, and the entry stays valid when only the normalisation changes. A re-encoded (lossy) form would
  change the pixels; general compression would cost more CPU on every hit than it saves in bytes.
* Entry file `<sha256 of key>.frames`: a fixed header (magic, metadata length, payload length, CRC-32 of
  metadata and payload), JSON metadata (the full key, shape and the caller's `info`), then the raw frames.
  A read checks the file size against the header, the key, the shape and the CRC; any mismatch is counted as
  corrupt, treated as a miss and the file removed.
* Atomic writes: a temp file in the same directory (`*.tmp`, never read), written, fsynced, then renamed over
  the entry name, so a reader sees the whole old entry, the whole new one, or none; a crash mid-write leaves
  only a temp file, which a later eviction pass deletes once it is an hour old. The directory itself is not
  fsynced: after a power cut a just-renamed entry may be missing, which is only a miss.
* LRU by file mtime: a put and every hit stamp the entry with a per-process strictly increasing
  nanosecond time (explicitly, because kernel file times tick only every few milliseconds). Recency thus lives
  in the file system, shared by all processes and kept across restarts, with no index file to corrupt.
* Size cap: after each put the directory is scanned and the least recently used entries deleted until the
  finished entries fit `max_bytes`; in-flight temp files may exceed it by one entry per writer. A scan costs
  about a millisecond per thousand entries, small next to the decode that a put follows.
* Processes: renames, deletions and the eviction pass take an exclusive flock on `<root>/.lock`, so two
  evictions never race and a corrupt-entry removal never deletes a fresh entry renamed over it. Reads take no
  lock: an open file stays readable after it is evicted or replaced.
* Counters (hits, misses, puts, evictions, corrupt, skipped, errors) are per process; `stats()` reads them.
  A failed write (disk full, permissions) is counted under `errors` and the video is still returned.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import struct
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MAGIC = b"VLVIDC01"
_HEADER = struct.Struct("<8sIQI")  # magic, metadata bytes, payload bytes, CRC-32 of metadata + payload
_SUFFIX = ".frames"
_TEMP_SUFFIX = ".tmp"
_STALE_TEMP_NS = 3600 * 10**9


@dataclass(frozen=True, slots=True)
class CacheKey:
    """What identifies an entry: the video, its content version and the sampling settings."""

    uri: str
    version: str
    params: str

    def digest(self) -> str:
        text = json.dumps([self.uri, self.version, self.params], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(kw_only=True, slots=True)
class VideoCacheConfig:
    """Where the cache lives (a local directory, created if missing) and how many bytes of entries to keep."""

    root: str | os.PathLike[str]
    max_bytes: int

    def __post_init__(self) -> None:
        if not os.fspath(self.root):
            raise ValueError("root must name a directory, got an empty path")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {self.max_bytes!r}")


class _Corrupt(Exception):
    pass


class VideoCache:
    """See the module docstring. Safe to share a root between processes; an instance holds no open files,
    so it can be pickled into loader workers."""

    def __init__(self, config: VideoCacheConfig) -> None:
        self.config = config
        self.root = Path(config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._counts = dict.fromkeys(
            ("hits", "misses", "puts", "evictions", "corrupt", "skipped", "errors"), 0
        )
        self._last_stamp = 0

    def stats(self) -> dict[str, int]:
        """This process's counters: hits, misses, puts, evictions, corrupt, skipped, errors."""
        return dict(self._counts)

    def path(self, key: CacheKey) -> Path:
        return self.root / f"{key.digest()}{_SUFFIX}"

    def get(self, key: CacheKey) -> np.ndarray | None:
        """The frames stored under `key`, or None (a miss; a corrupt entry is also removed)."""
        path = self.path(key)
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed below; the corrupt check needs its inode
        except FileNotFoundError:
            self._counts["misses"] += 1
            return None
        with file:
            try:
                frames = _read_entry(file, key)
            except _Corrupt:
                self._counts["corrupt"] += 1
                self._counts["misses"] += 1
                self._discard(path, os.fstat(file.fileno()))
                return None
        with suppress(FileNotFoundError):  # evicted since we opened it: the frames we read are still good
            self._stamp(path)
        self._counts["hits"] += 1
        return frames

    def put(self, key: CacheKey, frames: np.ndarray, *, info: Mapping[str, Any] | None = None) -> bool:
        """Store uint8 frames under `key`, then evict down to max_bytes; False if not stored."""
        if frames.dtype != np.uint8 or frames.size == 0:
            raise ValueError(f"frames must be a non-empty uint8 array, got {frames.dtype} {frames.shape}")
        payload = memoryview(np.ascontiguousarray(frames)).cast("B")
        meta = json.dumps(
            {"uri": key.uri, "version": key.version, "params": key.params, "shape": list(frames.shape),
             "info": dict(info or {})},
            ensure_ascii=False,
        ).encode()  # fmt: skip
        if _HEADER.size + len(meta) + payload.nbytes > self.config.max_bytes:
            self._counts["skipped"] += 1
            return False
        crc = zlib.crc32(payload, zlib.crc32(meta))
        path = self.path(key)
        temp = path.with_name(f"{path.stem}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        try:
            with open(temp, "xb") as file:
                file.write(_HEADER.pack(_MAGIC, len(meta), payload.nbytes, crc))
                file.write(meta)
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            self._stamp(temp)
            with self._locked():
                os.replace(temp, path)
        except OSError:
            with suppress(OSError):
                temp.unlink()
            self._counts["errors"] += 1
            return False
        self._counts["puts"] += 1
        self.evict()
        return True

    def total_bytes(self) -> int:
        """Bytes held by finished entries."""
        return sum(size for _, _, size in self._scan())

    def evict(self) -> None:
        """Delete least recently used entries until the rest fit max_bytes, and stale temp files."""
        with self._locked():
            entries = sorted(self._scan(remove_stale_temps=True))
            total = sum(size for _, _, size in entries)
            for _, name, size in entries:
                if total <= self.config.max_bytes:
                    break
                with suppress(FileNotFoundError):
                    (self.root / name).unlink()
                    self._counts["evictions"] += 1
                total -= size

    def _scan(self, *, remove_stale_temps: bool = False) -> Iterator[tuple[int, str, int]]:
        """(mtime_ns, name, size) of every entry; files that vanish mid-scan are skipped."""
        now = time.time_ns()
        with os.scandir(self.root) as it:
            for item in it:
                try:
                    if item.name.endswith(_SUFFIX):
                        st = item.stat()
                        yield st.st_mtime_ns, item.name, st.st_size
                    elif (
                        remove_stale_temps
                        and item.name.endswith(_TEMP_SUFFIX)
                        and now - item.stat().st_mtime_ns > _STALE_TEMP_NS
                    ):
                        os.unlink(item.path)
                except FileNotFoundError:
                    continue

    def _stamp(self, path: Path) -> None:
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        os.utime(path, ns=(self._last_stamp, self._last_stamp))

    def _discard(self, path: Path, seen: os.stat_result) -> None:
        """Remove a corrupt entry, unless another process has already replaced it with a new file."""
        with self._locked(), suppress(FileNotFoundError):
            current = os.stat(path)
            if (current.st_dev, current.st_ino) == (seen.st_dev, seen.st_ino):
                path.unlink()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    break
                except OSError as e:  # a signal arrived while waiting; wait again
                    if e.errno != errno.EINTR:
                        raise
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _read_entry(file: Any, key: CacheKey) -> np.ndarray:
    head = file.read(_HEADER.size)
    if len(head) != _HEADER.size:
        raise _Corrupt
    magic, meta_len, payload_len, crc = _HEADER.unpack(head)
    if magic != _MAGIC or os.fstat(file.fileno()).st_size != _HEADER.size + meta_len + payload_len:
        raise _Corrupt
    meta_bytes = file.read(meta_len)
    try:
        meta = json.loads(meta_bytes)
        shape = tuple(int(d) for d in meta["shape"])
    except (ValueError, KeyError, TypeError):
        raise _Corrupt from None
    if (meta.get("uri"), meta.get("version"), meta.get("params")) != (key.uri, key.version, key.params):
        raise _Corrupt
    if not shape or min(shape) < 1 or int(np.prod(shape)) != payload_len:
        raise _Corrupt
    frames = np.empty(shape, dtype=np.uint8)
    payload = memoryview(frames).cast("B")
    if file.readinto(payload) != payload_len or zlib.crc32(payload, zlib.crc32(meta_bytes)) != crc:
        raise _Corrupt
    return frames
