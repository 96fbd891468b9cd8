"""Tokenized text corpus in memory-mapped files: build once, then read any document without loading the rest.

Files, for a prefix P:

    P.bin    token ids of every document, concatenated, uint32 (the Qwen2 vocabulary needs more than 16 bits)
    P.mask   1 byte per token, 1 where the token is supervised; only when some document is a conversation
    P.idx    header, then (count + 1) int64 token offsets: document i is tokens offsets[i]:offsets[i+1]

    header (40 bytes, little-endian): magic b"VLCTXT\\0\\0", version u32, dtype code u32 (1 = uint32),
                                      flags u32 (bit 0: P.mask exists), reserved u32, count u64, tokens u64

Decisions:

- Inputs are JSONL records in the sample format: `{"text": ...}` documents are stored as text then
  `<|endoftext|>`, all supervised (as `formats.tokenize_pretraining` encodes them); conversations without
  media are stored as `chat.tokenize_chat` encodes them. Records with images or videos are refused.
- Labels are a parallel byte mask rather than a second id file: a quarter of the size, and labels are
  `where(mask, ids, -100)`. A corpus of plain text has no mask file at all (every token is supervised).
- Writing is atomic: each file is written under a temporary name, fsynced, then renamed, the index last;
  the reader checks every size against the index header, so a crash mid-build or a truncated copy is
  reported with the file's name instead of being read as garbage. Replacing a corpus while it is open for
  reading is not supported (the reader keeps its mappings of the old files on POSIX).
- Reading maps the files with numpy memmap; a document costs reading its own pages. Offsets are checked
  per access (start <= end <= tokens) rather than all at open, so opening a huge corpus is O(1).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.chat import IGNORE_INDEX, tokenize_chat
from trainer.data.formats import (
    ConversationSample,
    InterleavedSample,
    Sample,
    SampleError,
    TextItem,
    TextSample,
    iter_jsonl,
    media_items,
    messages_as_dicts,
    tokenize_pretraining,
)
from trainer.data.tokenizer import Qwen2VLTokenizer, load_tokenizer
from trainer.data.types import EncodedSample

MAGIC = b"VLCTXT\0\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIIIQQ")
_DTYPES = {1: np.dtype("<u4")}
_DTYPE_CODE = 1
_HAS_MASK = 1
_FLUSH_TOKENS = 1 << 20


class CorpusError(ValueError):
    """A corpus file is missing, truncated or corrupt; the message names the file."""


def corpus_paths(prefix: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(P.bin, P.mask, P.idx) for a prefix."""
    prefix = os.fspath(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".mask"), Path(prefix + ".idx")


class CorpusWriter:
    """Appends documents; `commit()` makes them visible atomically, leaving the temporaries otherwise."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.paths = corpus_paths(prefix)
        self.paths[0].parent.mkdir(parents=True, exist_ok=True)
        self._tmp = [p.with_name(f"{p.name}.tmp{os.getpid()}") for p in self.paths]
        self._bin = open(self._tmp[0], "wb")  # noqa: SIM115 - closed in commit/abort
        self._mask = open(self._tmp[1], "wb")  # noqa: SIM115
        self._offsets = [0]
        self._ids: list[np.ndarray] = []
        self._flags: list[np.ndarray] = []
        self._buffered = 0
        self._any_unsupervised = False

    def add(self, ids: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray | None = None) -> None:
        """One document; `labels` (IGNORE_INDEX where not supervised) default to all supervised."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(np.uint32).max)):
            raise ValueError(f"document {len(self)}: ids must be a 1-d sequence of uint32 values")
        if labels is None:
            flags = np.ones(len(ids), dtype=np.uint8)
        else:
            labels = np.asarray(labels)
            if labels.shape != ids.shape:
                raise ValueError(f"document {len(self)}: {len(ids)} ids but {len(labels)} labels")
            flags = (labels != IGNORE_INDEX).astype(np.uint8)
            self._any_unsupervised |= not flags.all()
        self._ids.append(ids.astype(_DTYPES[_DTYPE_CODE]))
        self._flags.append(flags)
        self._offsets.append(self._offsets[-1] + len(ids))
        self._buffered += len(ids)
        if self._buffered >= _FLUSH_TOKENS:
            self._flush()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _flush(self) -> None:
        for arrays, stream in ((self._ids, self._bin), (self._flags, self._mask)):
            for array in arrays:
                array.tofile(stream)
            arrays.clear()
        self._buffered = 0

    def commit(self) -> dict[str, Any]:
        self._flush()
        header = _HEADER.pack(
            MAGIC,
            VERSION,
            _DTYPE_CODE,
            _HAS_MASK if self._any_unsupervised else 0,
            0,
            len(self),
            self._offsets[-1],
        )
        with open(self._tmp[2], "wb") as idx:
            idx.write(header)
            np.asarray(self._offsets, dtype="<i8").tofile(idx)
            _sync(idx)
        for stream in (self._bin, self._mask):
            _sync(stream)
            stream.close()
        bin_path, mask_path, idx_path = self.paths
        os.replace(self._tmp[0], bin_path)
        if self._any_unsupervised:
            os.replace(self._tmp[1], mask_path)
        else:
            os.unlink(self._tmp[1])
        os.replace(self._tmp[2], idx_path)  # the index last: it is what makes the new files the corpus
        if not self._any_unsupervised:
            mask_path.unlink(missing_ok=True)  # a stale mask of an older build at this prefix
        _sync_dir(idx_path.parent)
        return {
            "prefix": str(idx_path.with_suffix("")),
            "documents": len(self),
            "tokens": self._offsets[-1],
            "has_mask": self._any_unsupervised,
        }

    def abort(self) -> None:
        for stream in (self._bin, self._mask):
            stream.close()
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


def _sync(stream: Any) -> None:
    stream.flush()
    os.fsync(stream.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_text_record(sample: Sample, tokenizer: Qwen2VLTokenizer) -> tuple[list[int], list[int]]:
    """Ids and labels of a text document or a conversation without media."""
    if media_items(sample):
        raise SampleError(
            f"{sample.source}: the sample holds images or videos; a text corpus stores text only"
        )
    if isinstance(sample, ConversationSample):
        return tokenize_chat(messages_as_dicts(sample), tokenizer)
    if isinstance(sample, TextSample):
        return tokenize_pretraining((TextItem(sample.text),), tokenizer)
    if isinstance(sample, InterleavedSample):  # text items only, checked above
        return tokenize_pretraining(sample.items, tokenizer)
    raise SampleError(f"{sample.source}: a {sample.kind} sample cannot go into a text corpus")


def build_corpus(
    samples: Iterable[Sample], prefix: str | os.PathLike[str], *, tokenizer: Qwen2VLTokenizer
) -> dict[str, Any]:
    """Tokenize `samples` into the corpus at `prefix`; returns its stats. Nothing is replaced on error."""
    with CorpusWriter(prefix) as writer:
        for sample in samples:
            writer.add(*encode_text_record(sample, tokenizer))
        return writer.commit()


class TextCorpus:
    """Random access to a built corpus: `len()`, `corpus[i]` (an EncodedSample), `ids(i)` (zero-copy)."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.prefix = os.fspath(prefix)
        bin_path, mask_path, idx_path = corpus_paths(prefix)
        size = _size(idx_path)
        if size < _HEADER.size:
            raise CorpusError(
                f"{idx_path}: truncated: {size} bytes, shorter than the {_HEADER.size}-byte header"
            )
        with open(idx_path, "rb") as f:
            magic, version, dtype_code, flags, _, count, tokens = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise CorpusError(f"{idx_path}: not a text corpus index (magic {magic!r})")
        if version != VERSION or dtype_code not in _DTYPES:
            raise CorpusError(f"{idx_path}: unsupported version {version} or dtype code {dtype_code}")
        expected = _HEADER.size + (count + 1) * 8
        if size != expected:
            raise CorpusError(
                f"{idx_path}: truncated or corrupt: {count} documents need {expected} bytes, "
                f"the file has {size}"
            )
        self._offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=_HEADER.size, shape=(count + 1,))
        if self._offsets[0] != 0 or self._offsets[-1] != tokens:
            raise CorpusError(
                f"{idx_path}: corrupt offsets (first {self._offsets[0]}, last "
                f"{self._offsets[-1]}, header says {tokens} tokens)"
            )
        dtype = _DTYPES[dtype_code]
        self.num_tokens = int(tokens)
        self.tokens = _map(bin_path, dtype, self.num_tokens)
        self.mask = _map(mask_path, np.dtype(np.uint8), self.num_tokens) if flags & _HAS_MASK else None
        self._idx_path = idx_path

    @property
    def has_labels(self) -> bool:
        """True when some tokens are not supervised (the corpus has a mask file)."""
        return self.mask is not None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def _span(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a corpus of {n}")
        i %= n
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        if not 0 <= start <= end <= self.num_tokens:
            raise CorpusError(f"{self._idx_path}: corrupt offsets for document {i}: {start}..{end}")
        return start, end

    def ids(self, i: int) -> np.ndarray:
        """Token ids of document i, a read-only view into the mapped file."""
        start, end = self._span(i)
        return self.tokens[start:end]

    def __getitem__(self, i: int) -> EncodedSample:
        start, end = self._span(i)
        ids = self.tokens[start:end].astype(np.int64)
        labels = ids.copy() if self.mask is None else np.where(self.mask[start:end] != 0, ids, IGNORE_INDEX)
        return EncodedSample(index=i % len(self), input_ids=ids, labels=labels, source=f"{self.prefix}#{i}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickling a memmap copies the whole array; loader workers reopen the files instead.
        return (TextCorpus, (self.prefix,))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise CorpusError(f"{path}: corpus file not found") from None


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    size = _size(path)
    if size != count * dtype.itemsize:
        raise CorpusError(
            f"{path}: truncated or corrupt: expected {count * dtype.itemsize} bytes for {count} "
            f"tokens, the file has {size}"
        )
    if count == 0:
        return np.empty(0, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.text_corpus", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="tokenize a JSONL file into PREFIX.bin/.idx(/.mask)")
    build.add_argument("input", help="JSONL file: local path or fsspec URL")
    build.add_argument("prefix", help="output prefix (local)")
    build.add_argument("--tokenizer", help="checkpoint folder with tokenizer.json (default: builtin)")
    info = commands.add_parser("info", help="print a corpus's document and token counts")
    info.add_argument("prefix")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            stats = build_corpus(
                iter_jsonl(args.input), args.prefix, tokenizer=load_tokenizer(args.tokenizer)
            )
        else:
            corpus = TextCorpus(args.prefix)
            stats = {
                "prefix": corpus.prefix,
                "documents": len(corpus),
                "tokens": corpus.num_tokens,
                "has_mask": corpus.has_labels,
            }
    except (SampleError, CorpusError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
