"""CheckpointStore: where step folders live and how a save commits, on a local disk or an fsspec object store.

Decisions:

* Local roots must be one file system that every rank sees (a node's disk for one node; NFS, Lustre and the
  like across nodes): rank 0 creates and renames the folder the other ranks write into.
* Local roots: a save writes into `step-N.tmp-<nonce>`, fsyncs every file and the folder, renames the folder to
  `step-N` and fsyncs the root, so after a crash the step is either whole and committed or a stale tmp folder.
  Object stores (s3://, gs://, memory://...): rename copies and is not atomic, so the folder has its final
  name from the start and `manifest.json`, a single PUT written last, is the commit (see trainer.contract).
* Checksums are computed while DCP writes, not by reading the files back: DCP's file system is wrapped so every
  stream it opens for writing feeds zlib.crc32 as the bytes pass (about 2 GB/s, the GIL released). The
  shards are thus never read twice, and each rank reports exactly the files it wrote, `.metadata` included.
* Deleting a committed step un-commits it first (local: rename to a tmp name; object store: delete the
  manifest), so a crash half way through a deletion never leaves a folder that looks committed but is not whole.
* Saving a step that already exists (a run resumed from an older step reaches it again) replaces it: the old
  folder is un-committed just before the new one commits (local) or before any rank writes (object store).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

# The fsspec writer and reader are not re-exported from torch.distributed.checkpoint.
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import FileSystemBase

from trainer.contract.checkpoint import (
    MANIFEST,
    Manifest,
    ManifestFile,
    crc_hex,
    is_local,
    join,
    list_step_dirs,
    open_root,
    step_dirname,
    verify,
)

log = logging.getLogger(__name__)


def _nonce() -> str:
    return uuid.uuid4().hex[:12]


class _CrcStream(io.RawIOBase):
    """A write-only stream that checksums what passes through it on the way to `raw`."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self.raw = raw
        self.size = 0
        self.crc = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.raw.write(view)
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.raw.tell()

    def flush(self) -> None:
        self.raw.flush()

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        # The owner of `raw` closes it; DCP closes this wrapper early, before fsync through fileno().
        pass


class _ChecksummingFS(FileSystemBase):
    """DCP's file system with every written file's size and CRC-32 recorded in `records` (by file name)."""

    def __init__(self, inner: FileSystemBase, records: dict[str, tuple[int, int]]) -> None:
        self.inner = inner
        self.records = records

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        with self.inner.create_stream(path, mode) as raw:
            if "w" not in mode and "a" not in mode:
                yield raw
                return
            stream = _CrcStream(raw)
            yield stream
        self.records[os.path.basename(os.fspath(path))] = (stream.size, stream.crc)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.inner.rename(path, new_path)
        old, new = os.path.basename(os.fspath(path)), os.path.basename(os.fspath(new_path))
        if old in self.records:
            self.records[new] = self.records.pop(old)

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str | os.PathLike:
        return self.inner.concat_path(path, suffix)

    def init_path(self, path: str | os.PathLike) -> str | os.PathLike:
        return self.inner.init_path(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        self.inner.mkdir(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def exists(self, path: str | os.PathLike) -> bool:
        return self.inner.exists(path)

    def rm_file(self, path: str | os.PathLike) -> None:
        self.inner.rm_file(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """One checkpoint root. Folder-level operations (begin, commit, remove, prune) are rank 0's alone."""

    def __init__(self, uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.uri = uri
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = open_root(uri, self.storage_options)
        self.local = is_local(self.fs)

    def step_uri(self, step: int) -> str:
        return join(self.uri, step_dirname(step))

    def _path(self, uri: str) -> str:
        return open_root(uri, self.storage_options)[1]

    def _url(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def begin(self, step: int) -> str:
        """Create the folder a save of `step` writes into; return its path (for every rank)."""
        final = join(self.root, step_dirname(step))
        if self.local:
            work = f"{final}.tmp-{_nonce()}"
            os.makedirs(work)
            return work
        if self.fs.exists(final):
            self.remove(final)
        return final

    def write_file(self, folder: str, name: str, data: bytes, *, rank: int) -> ManifestFile:
        """Write one small file durably; return its manifest entry."""
        path = join(folder, name)
        if self.local:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            self.fs.pipe_file(path, data)
        return ManifestFile(path=name, size=len(data), crc32=crc_hex(zlib.crc32(data)), rank=rank)

    def dcp_writer(
        self, folder: str, *, thread_count: int
    ) -> tuple[FileSystemWriter, dict[str, tuple[int, int]]]:
        """A DCP writer into `folder` and the dict where it records (size, CRC-32) of each file it writes."""
        if self.local:
            writer = FileSystemWriter(folder, thread_count=thread_count, sync_files=True)
        else:  # an object is durable once its upload completes: nothing to fsync
            writer = FsspecWriter(
                self._url(folder), thread_count=thread_count, sync_files=False, **self.storage_options
            )
        records: dict[str, tuple[int, int]] = {}
        writer.fs = _ChecksummingFS(writer.fs, records)
        return writer, records

    def dcp_reader(self, step_uri: str) -> FileSystemReader:
        path = self._path(step_uri)
        if self.local:
            return FileSystemReader(path)
        return FsspecReader(self._url(path), **self.storage_options)

    def commit(self, folder: str, step: int, manifest: Manifest) -> str:
        """Write the manifest last and make the step visible; return the step's URI."""
        data = (json.dumps(manifest, indent=1) + "\n").encode()
        final = join(self.root, step_dirname(step))
        if not self.local:
            self.fs.pipe_file(join(folder, MANIFEST), data)  # the commit
            return self.step_uri(step)
        self.write_file(folder, MANIFEST, data, rank=0)
        _fsync_dir(folder)  # the entries of files other ranks wrote, too
        old = None
        if os.path.exists(final):
            old = f"{final}.tmp-old{_nonce()}"
            os.rename(final, old)
        os.rename(folder, final)  # the commit
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.step_uri(step)

    def remove(self, path: str) -> None:
        """Delete a step folder (committed or not), un-committing it first."""
        if self.local:
            doomed = f"{path}.tmp-del{_nonce()}" if ".tmp-" not in os.path.basename(path) else path
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            return
        manifest = join(path, MANIFEST)
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)
        self.fs.rm(path, recursive=True)

    def committed_and_stale(self) -> tuple[list[tuple[int, str]], list[str]]:
        """Committed steps (step, path), oldest first, and the paths of unfinished saves older than the newest
        commit: those are crashed saves, while a newer unfinished one may still be being written."""
        committed, unfinished = [], []
        for step, final_name, path in list_step_dirs(self.fs, self.root):
            if final_name and self.fs.exists(join(path, MANIFEST)):
                committed.append((step, path))
            else:
                unfinished.append((step, path))
        newest = committed[-1][0] if committed else -1
        return committed, [path for step, path in unfinished if step < newest]

    def prune(self, keep_last: int) -> list[str]:
        """Delete committed steps beyond the newest `keep_last`, except the newest one that verifies (by size),
        and crashed saves; return what was deleted."""
        committed, stale = self.committed_and_stale()
        keep = {step for step, _ in committed[-keep_last:]}
        for step, path in reversed(committed):
            if verify(self._url(path), mode="size", storage_options=self.storage_options):
                keep.add(step)
                break
        doomed = [path for step, path in committed if step not in keep] + stale
        for path in doomed:
            try:
                self.remove(path)
            except OSError as e:  # the next prune tries again
                log.warning("could not delete old checkpoint folder %s: %s", path, e)
        return doomed
