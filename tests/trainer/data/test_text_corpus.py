"""Memory-mapped text corpus: build from JSONL (library and CLI), random reads of ids and labels, atomic
replacement, and one-line errors naming the file for truncated or corrupt corpora."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.data.chat import IGNORE_INDEX, tokenize_chat
from trainer.data.formats import SampleError, iter_jsonl
from trainer.data.text_corpus import MAGIC, CorpusError, CorpusWriter, TextCorpus, build_corpus, main
from trainer.data.tokenizer import ENDOFTEXT, Qwen2VLTokenizer

REPO = Path(__file__).parents[3]
WORDS = ["the", "a", "red", "blue", "circle", "moves", "left", "up", "中文", "café", "42", "seven"]


@pytest.fixture(scope="module")
def tok() -> Qwen2VLTokenizer:
    return Qwen2VLTokenizer.builtin()


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
        if i % 3 == 2:
            out.append(
                {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": words}]}
            )
        else:
            out.append({"text": f"{i}: {words}"})
    return out


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _expected(record: dict, tok: Qwen2VLTokenizer) -> tuple[list[int], list[int]]:
    if "text" in record:
        ids = tok.encode(record["text"]) + [ENDOFTEXT]
        return ids, ids
    return tokenize_chat(record["messages"], tok)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tok: Qwen2VLTokenizer) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("corpus")
    records = _records(3000)
    stats = build_corpus(iter_jsonl(_write_jsonl(folder / "in.jsonl", records)), folder / "c", tokenizer=tok)
    assert stats["documents"] == 3000 and stats["has_mask"]
    return folder / "c", records


def test_random_reads_match_tokenization(built: tuple[Path, list[dict]], tok: Qwen2VLTokenizer) -> None:
    prefix, records = built
    corpus = TextCorpus(prefix)
    assert len(corpus) == 3000 and corpus.has_labels
    assert corpus.num_tokens == sum(len(_expected(r, tok)[0]) for r in records)
    for i in [0, 1, 2, 2999, *random.Random(1).sample(range(3000), 200)]:
        ids, labels = _expected(records[i], tok)
        sample = corpus[i]
        assert sample.index == i and sample.input_ids.dtype == np.int64
        assert sample.input_ids.tolist() == ids and sample.labels.tolist() == labels
    assert corpus[-1].input_ids.tolist() == corpus[2999].input_ids.tolist()
    assert (corpus[2].labels == IGNORE_INDEX).any()  # a conversation: the prompt is not supervised
    with pytest.raises(IndexError):
        corpus[3000]


def test_reader_maps_instead_of_loading(built: tuple[Path, list[dict]]) -> None:
    prefix, _ = built
    corpus = TextCorpus(prefix)
    assert isinstance(corpus.tokens, np.memmap) and isinstance(corpus.mask, np.memmap)
    view = corpus.ids(1234)
    assert np.shares_memory(view, corpus.tokens) and not view.flags.writeable
    # Workers get the prefix, not a copy of the mapped tokens.
    clone = pickle.loads(pickle.dumps(corpus))
    assert len(pickle.dumps(corpus)) < 1000 < corpus.tokens.nbytes
    assert clone[1234].input_ids.tolist() == view.tolist()


def test_plain_text_corpus_has_no_mask(tmp_path: Path, tok: Qwen2VLTokenizer) -> None:
    records = [{"text": f"doc {i}"} for i in range(5)]
    prefix = tmp_path / "plain"
    (tmp_path / "plain.mask").write_bytes(b"stale")  # left by an older build: removed
    build_corpus(iter_jsonl(_write_jsonl(tmp_path / "in.jsonl", records)), prefix, tokenizer=tok)
    corpus = TextCorpus(prefix)
    assert corpus.mask is None and not (tmp_path / "plain.mask").exists()
    assert corpus[3].labels.tolist() == corpus[3].input_ids.tolist() == tok.encode("doc 3") + [ENDOFTEXT]
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "plain.bin", "plain.idx"]


def test_empty_corpus(tmp_path: Path) -> None:
    with CorpusWriter(tmp_path / "empty") as writer:
        writer.commit()
    corpus = TextCorpus(tmp_path / "empty")
    assert len(corpus) == 0 and corpus.num_tokens == 0


def test_failed_build_keeps_the_old_corpus(tmp_path: Path, tok: Qwen2VLTokenizer) -> None:
    prefix = tmp_path / "c"
    build_corpus(iter_jsonl(_write_jsonl(tmp_path / "a.jsonl", [{"text": "old"}])), prefix, tokenizer=tok)
    bad = _write_jsonl(tmp_path / "b.jsonl", [{"text": "new"}, {"image": "x.png", "text": "caption"}])
    with pytest.raises(SampleError, match=rf"^{bad}:2: the sample holds images or videos"):
        build_corpus(iter_jsonl(bad), prefix, tokenizer=tok)
    assert tok.decode(TextCorpus(prefix).ids(0)) == "old<|endoftext|>"
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl", "c.bin", "c.idx"]


def _copy_corpus(src: Path, dst: Path) -> Path:
    for suffix in (".bin", ".idx", ".mask"):
        Path(str(dst) + suffix).write_bytes(Path(str(src) + suffix).read_bytes())
    return dst


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


CORRUPTIONS = {
    "bin truncated": (".bin", lambda p: _truncate(p, p.stat().st_size - 4), r"c\.bin: truncated or corrupt"),
    "mask truncated": (".mask", lambda p: _truncate(p, 10), r"c\.mask: truncated or corrupt"),
    "mask missing": (".mask", lambda p: p.unlink(), r"c\.mask: corpus file not found"),
    "bin missing": (".bin", lambda p: p.unlink(), r"c\.bin: corpus file not found"),
    "idx truncated": (".idx", lambda p: _truncate(p, p.stat().st_size - 8), r"c\.idx: truncated or corrupt"),
    "idx header cut": (".idx", lambda p: _truncate(p, 12), r"c\.idx: truncated: 12 bytes"),
    "bad magic": (
        ".idx",
        lambda p: p.write_bytes(b"GARBAGE!" + p.read_bytes()[8:]),
        r"c\.idx: not a text corpus",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_files_are_named(built: tuple[Path, list[dict]], tmp_path: Path, name: str) -> None:
    suffix, damage, message = CORRUPTIONS[name]
    prefix = _copy_corpus(built[0], tmp_path / "c")
    damage(Path(str(prefix) + suffix))
    with pytest.raises(CorpusError, match=message) as info:
        TextCorpus(prefix)
    assert "\n" not in str(info.value)


def test_corrupt_offset_is_reported_on_read(built: tuple[Path, list[dict]], tmp_path: Path) -> None:
    prefix = _copy_corpus(built[0], tmp_path / "c")
    idx = Path(str(prefix) + ".idx")
    data = bytearray(idx.read_bytes())
    assert data[:8] == MAGIC
    offset = 40 + 8 * 10  # offsets[10]: document 9 ends where document 10 starts
    data[offset : offset + 8] = np.int64(10**12).tobytes()
    idx.write_bytes(bytes(data))
    corpus = TextCorpus(prefix)
    assert corpus[8].input_ids.size > 0  # other documents still read
    with pytest.raises(CorpusError, match=r"c\.idx: corrupt offsets for document 9"):
        corpus[9]


def test_cli_build_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_jsonl(tmp_path / "in.jsonl", _records(30))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "trainer.data.text_corpus", "build", str(src), str(tmp_path / "out" / "c")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["documents"] == 30
    assert main(["info", str(tmp_path / "out" / "c")]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 30

    assert main(["info", str(tmp_path / "nope")]) == 1
    assert "nope.idx: corpus file not found" in capsys.readouterr().err
    bad = _write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "ok"}, {"messages": [{"role": "x", "content": "y"}]}]
    )
    assert main(["build", str(bad), str(tmp_path / "bad")]) == 1
    assert f"{bad}:2: messages[0].role: unknown role 'x'" in capsys.readouterr().err
