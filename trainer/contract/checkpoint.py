"""Checkpoint layout, manifest and "latest valid" lookup: what the controller reads, without torch.

A checkpoint root (a directory or an fsspec URL such as s3://bucket/run-7/checkpoints) holds one folder per
saved step:

    step-00000012/
        .metadata, __0_0.distcp, __1_0.distcp, ...   torch.distributed.checkpoint (DCP) shards, one file per rank
        rank-00000.pt, rank-00001.pt, ...             per-rank plain state (RNG, data loader), torch.save
        meta.json                                     step, tokens seen, layout, training config (CheckpointMeta)
        manifest.json                                 every other file with its size and CRC-32; written last

Decisions:

* Commit protocol. On a local file system a save writes into `step-00000012.tmp-<nonce>` and renames it to
  `step-00000012` after the manifest is on disk: the rename is the commit. Object stores have no atomic rename,
  so there the folder has its final name from the start and the manifest, one object written last, is the
  commit marker. One rule covers both: a step is committed when its folder has the final name and holds
  `manifest.json`. Anything else is an unfinished or crashed save and is never loaded.
* Valid = committed and verified: every listed file exists with the listed size ("size": a stat per file,
  cheap enough for every resume) and, with "checksum", the listed CRC-32. CRC-32 (zlib, streamed in 8 MiB
  reads) runs at about 2 GB/s on one core, as fast as a disk delivers and twice sha1; it catches truncation
  and bit rot, which is the job here (nobody forges checkpoints). `latest_valid` walks back from the newest
  step and logs a warning naming the step and the bad file for every step it skips.
* fsspec for every root, local ones included, so the controller runs the same code against any store; listings
  drop fsspec's directory cache first, because another process (the trainer) writes the folders.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)

FORMAT = "vlctl-checkpoint/1"
MANIFEST = "manifest.json"
META = "meta.json"
VERIFY_MODES = ("size", "checksum")
VerifyMode = Literal["size", "checksum"]

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_DIR = re.compile(r"^step-(\d{8,})\.tmp-[0-9a-z-]+$")
_CHUNK = 8 << 20


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Where and how often the trainer saves, and how resume checks a checkpoint before loading it."""

    uri: str  # directory or fsspec URL holding the step-XXXXXXXX folders
    interval_steps: int = 500  # save when step % interval_steps == 0; 0 saves only when asked
    keep_last: int = 3  # committed checkpoints kept; the newest valid one is never deleted
    async_save: bool = True  # write in a background thread: training blocks only while state is copied
    verify: VerifyMode = "size"  # check before loading: sizes only, or sizes and CRC-32 of every file
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options, e.g. endpoint_url
    timeout_s: float = 1800.0  # collectives of the checkpoint process group (a dead rank fails the save)
    write_threads: int = 1  # writer threads per rank (one shard file each)
    # A save that fails because the storage cannot be written (see trainer.checkpoint.outage) is retried with
    # backoff while training goes on, for this long after the first failure; then the run gives up.
    storage_outage_seconds: float = 600.0

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise ValueError(f"uri must be a non-empty path or URL, got {self.uri!r}")
        if "::" in self.uri:
            raise ValueError(f"uri must be a plain path or URL, not a chained fsspec URL: {self.uri!r}")
        for name, low in (("interval_steps", 0), ("keep_last", 1), ("write_threads", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if not isinstance(self.async_save, bool):
            raise ValueError(f"async_save must be a bool, got {self.async_save!r}")
        if not isinstance(self.storage_options, Mapping):
            raise ValueError(f"storage_options must be a mapping, got {type(self.storage_options).__name__}")
        if (
            isinstance(self.timeout_s, bool)
            or not isinstance(self.timeout_s, int | float)
            or self.timeout_s <= 0
        ):
            raise ValueError(f"timeout_s must be a number > 0, got {self.timeout_s!r}")
        value = self.storage_outage_seconds
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
            raise ValueError(f"storage_outage_seconds must be a finite number >= 0, got {value!r}")


class ManifestFile(TypedDict):
    path: str  # relative to the step folder
    size: int  # bytes
    crc32: str  # 8 hex digits
    rank: int  # the rank that wrote it


class Manifest(TypedDict):
    format: str  # FORMAT
    step: int
    world_size: int
    files: list[ManifestFile]


class Layout(TypedDict):
    dp: int  # data-parallel size (ZeRO-1 partitions the optimizer over it)
    tp: int  # tensor-parallel size
    pp: int  # pipeline stages
    world_size: int


class CheckpointMeta(TypedDict):
    format: str
    step: int  # optimizer steps completed
    tokens_seen: int
    layout: Layout
    scheduler: dict[str, Any]  # LR scheduler state_dict (JSON)
    config: dict[str, Any]  # the training config, as JSON
    extra: dict[str, Any]  # anything else the trainer keeps (JSON)


@dataclass(frozen=True, slots=True)
class StepInfo:
    step: int
    uri: str  # the step folder, in the root's own form (path or URL)


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    problem: str = ""  # one line naming the bad file, empty when ok

    def __bool__(self) -> bool:
        return self.ok


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def rank_filename(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def parse_step_dirname(name: str) -> tuple[int, bool] | None:
    """(step, committed-name) for a step folder name, None for anything else."""
    if m := _STEP_DIR.match(name):
        return int(m.group(1)), True
    if m := _TMP_DIR.match(name):
        return int(m.group(1)), False
    return None


def open_root(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The file system and the root path inside it (no trailing slash)."""
    fs, path = url_to_fs(uri, **dict(storage_options or {}))
    return fs, path.rstrip("/") or "/"


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def list_step_dirs(fs: AbstractFileSystem, root: str) -> list[tuple[int, bool, str]]:
    """(step, committed-name, path) of every step folder under root, oldest step first."""
    fs.invalidate_cache(root)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        parsed = parse_step_dirname(entry["name"].rstrip("/").rsplit("/", 1)[-1])
        if parsed is not None:
            found.append((parsed[0], parsed[1], entry["name"].rstrip("/")))
    return sorted(found)


def list_checkpoints(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> list[StepInfo]:
    """Committed steps (final folder name and a manifest), oldest first; not yet verified."""
    fs, root = open_root(uri, storage_options)
    return [
        StepInfo(step=step, uri=join(uri, step_dirname(step)))
        for step, committed, path in list_step_dirs(fs, root)
        if committed and fs.exists(join(path, MANIFEST))
    ]


def read_json(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> Any:
    fs, path = url_to_fs(uri, **dict(storage_options or {}))
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def read_manifest(step_uri: str, *, storage_options: Mapping[str, Any] | None = None) -> Manifest:
    """The parsed manifest; ValueError naming the file when it is missing, unreadable or malformed."""
    where = join(step_uri, MANIFEST)
    try:
        manifest = read_json(where, storage_options=storage_options)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: unreadable manifest ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: not a {FORMAT} manifest")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict)
        and isinstance(f.get("size"), int)
        and isinstance(f.get("crc32"), str)
        and isinstance(f.get("path"), str)
        and f["path"] not in ("", ".", "..")
        and "/" not in f["path"]
        for f in files
    ):  # fmt: skip  (a step folder is flat: a path never leaves it)
        raise ValueError(f"{where}: malformed file list")
    return manifest  # type: ignore[return-value]


def read_meta(step_uri: str, *, storage_options: Mapping[str, Any] | None = None) -> CheckpointMeta:
    return read_json(join(step_uri, META), storage_options=storage_options)


def crc32_stream(read: Any, size_hint: int = _CHUNK) -> tuple[int, int]:
    """(bytes, CRC-32) of everything `read(n)` returns until it returns b""."""
    crc = size = 0
    while chunk := read(size_hint):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return size, crc


def crc_hex(crc: int) -> str:
    return f"{crc:08x}"


def _check_file(fs: AbstractFileSystem, path: str, entry: ManifestFile, mode: VerifyMode) -> str:
    name = entry["path"]
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return f"{name} is missing"
    if size != entry["size"]:
        return f"{name} has {size} bytes, the manifest lists {entry['size']}"
    if mode == "checksum":
        with fs.open(path, "rb", block_size=_CHUNK) as f:
            size, crc = crc32_stream(f.read)
        if size != entry["size"] or crc_hex(crc) != entry["crc32"]:
            return f"{name} has CRC-32 {crc_hex(crc)}, the manifest lists {entry['crc32']}"
    return ""


def verify(
    step_uri: str,
    *,
    mode: VerifyMode = "size",
    part: tuple[int, int] = (0, 1),
    storage_options: Mapping[str, Any] | None = None,
) -> Verification:
    """Check a step folder against its manifest. `part=(i, n)` checks only every n-th file starting at i, so
    n ranks can split the reading of a large checkpoint; the manifest itself is checked by every part."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"mode must be one of {VERIFY_MODES}, got {mode!r}")
    index, count = part
    try:
        manifest = read_manifest(step_uri, storage_options=storage_options)
    except ValueError as e:
        return Verification(ok=False, problem=str(e))
    fs, root = open_root(step_uri, storage_options)
    fs.invalidate_cache(root)
    mine = manifest["files"][index::count]
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(mine)))) as pool:  # zlib releases the GIL
        problems = pool.map(lambda e: _check_file(fs, join(root, e["path"]), e, mode), mine)
        first = next((p for p in problems if p), "")
    return Verification(ok=not first, problem=f"{step_uri}: {first}" if first else "")


_verify = verify  # latest_valid's `verify` parameter shadows the function


def latest_valid(
    uri: str, *, verify: VerifyMode = "size", storage_options: Mapping[str, Any] | None = None
) -> StepInfo | None:
    """The newest committed step whose files match its manifest; None when there is none."""
    for info in reversed(list_checkpoints(uri, storage_options=storage_options)):
        result = _verify(info.uri, mode=verify, storage_options=storage_options)
        if result.ok:
            return info
        log.warning(
            "checkpoint step %d is invalid, falling back to an older one: %s", info.step, result.problem
        )
    return None
