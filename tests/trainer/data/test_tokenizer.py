"""The Qwen2-VL tokenizer: known ids, special tokens, round trips, and parity with a `tokenizers` BPE.

The released `tokenizer.json` cannot be downloaded in tests, so the parity reference is rebuilt here the
way transformers' Qwen2Converter builds it (NFC, Split(pattern, isolated), ByteLevel without its own regex,
BPE over vocab + merges, non-normalized special tokens), with transformers' pattern and with the merges
recovered from the ranks. A published copy of Qwen2's `merges.txt` was compared with merges recovered this
way: the first lines, lines in the middle and the last lines were identical, odd splits such as "ðĿ ĵĺ"
included. `test_recovered_merges_match_released` pins a few of those lines.
"""

from __future__ import annotations

import pickle
import random
import unicodedata
from pathlib import Path

import pytest

from trainer.data import tokenizer as tokmod
from trainer.data.tokenizer import (
    IM_END,
    IM_START,
    IMAGE_PAD,
    QWEN2_PRETOKENIZE_PATTERN,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    Qwen2VLTokenizer,
    load_tokenizer,
)


@pytest.fixture(scope="module")
def tok() -> Qwen2VLTokenizer:
    return Qwen2VLTokenizer.builtin()


def test_known_ids(tok: Qwen2VLTokenizer) -> None:
    assert tok.encode("assistant") == [77091]
    assert tok.encode("user") == [872]
    assert tok.encode("system") == [8948]
    assert tok.encode("\n") == [198]
    # From the Qwen2TokenizerFast docstring in transformers: a leading space is part of the token.
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode(" Hello world") == [21927, 1879]


def test_sizes_and_cache(tok: Qwen2VLTokenizer) -> None:
    assert tok.vocab_size == len(tok) == VOCAB_SIZE == 151_657
    assert Qwen2VLTokenizer.builtin() is tok
    assert load_tokenizer(None) is tok


def test_special_tokens(tok: Qwen2VLTokenizer) -> None:
    assert list(SPECIAL_TOKENS.values()) == list(range(151_643, 151_657))
    for name, token_id in SPECIAL_TOKENS.items():
        assert tok.encode(name) == [token_id]
        assert tok.token_to_id(name) == token_id
        assert tok.id_to_token(token_id) == name
        assert tok.decode([token_id]) == name
    # Matched whole anywhere in text, never merged with neighbours...
    ids = tok.encode("a<|im_end|>b<|im_start|><|image_pad|><|image_pad|>")
    assert ids == [tok.encode("a")[0], IM_END, tok.encode("b")[0], IM_START, IMAGE_PAD, IMAGE_PAD]
    # ...while near misses are plain text.
    assert not set(tok.encode("<|im_end| <im_end> <|IM_END|>")) & set(SPECIAL_TOKENS.values())


def test_digits_split_one_by_one(tok: Qwen2VLTokenizer) -> None:
    digits = [tok.encode(str(d))[0] for d in range(10)]
    assert tok.encode("9876543210") == [digits[int(c)] for c in "9876543210"]


def test_token_to_id_uses_byte_level_spelling(tok: Qwen2VLTokenizer) -> None:
    assert tok.token_to_id("Ġhello") == tok.encode(" hello")[0]
    assert tok.token_to_id("Ċ") == 198
    assert tok.token_to_id("no such token, surely") is None
    assert tok.token_to_id("\u4e00\u4e01\u4e02 not byte-level") is None
    for token_id in random.Random(0).sample(range(151_643), 500):
        assert tok.token_to_id(tok.id_to_token(token_id)) == token_id
    assert tok.id_to_token(VOCAB_SIZE) is None


def _random_text(rng: random.Random, n: int) -> str:
    blocks = [
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x300, 0x36F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x590, 0x6FF),
        (0x900, 0x97F),
        (0xE00, 0xE7F),
        (0x1100, 0x11FF),
        (0x2000, 0x206F),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1D400, 0x1D7FF),
        (0x1F300, 0x1FAFF),
    ]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(blocks)
        out.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.2:
            out.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "42", "'s", "'LL"]))
    return "".join(out)


def test_round_trip_random_unicode(tok: Qwen2VLTokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        text = _random_text(rng, rng.randint(0, 200))
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_nfc_normalisation(tok: Qwen2VLTokenizer) -> None:
    for text in ["café", "Tiếng Việt", "한국어", "Å ñ ö"]:
        nfd = unicodedata.normalize("NFD", text)
        assert nfd != text
        assert tok.encode(nfd) == tok.encode(text)
    # A combining mark right after a special token must not merge with its '>' (">" + U+0338 is "≯").
    assert tok.encode("<|im_end|>\u0338") == [IM_END, *tok.encode("\u0338")]
    assert tok.encode("x>\u0338") == tok.encode("x\u226f")


def test_decode(tok: Qwen2VLTokenizer) -> None:
    np = pytest.importorskip("numpy")
    ids = tok.encode("<|im_start|>user\nhello 世界<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhello 世界"
    assert tok.decode(np.array(ids)) == "<|im_start|>user\nhello 世界<|im_end|>"
    assert tok.decode(tok.encode("世")[:1]) == "世"
    with pytest.raises(ValueError, match="151657"):
        tok.decode([1, VOCAB_SIZE])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Qwen2VLTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)
    ranks = tmp_path / "bad.tiktoken"
    ranks.write_bytes(b"IQ== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        tokmod._load_ranks(ranks)


# ----------------------------------------------------------------------------------------------------------
# Parity with a `tokenizers` BPE built like Qwen2's tokenizer.json.


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per token: the last step of BPE on the token's bytes using only lower-ranked tokens."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best_rank, best = rank, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1], rank)
                if r < best_rank:
                    best_rank, best = r, i
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        assert len(parts) == 2, token
        merges.append((parts[0], parts[1]))
    return merges


@pytest.fixture(scope="module")
def qwen2_pattern() -> str:
    """The pre-tokenization regex from transformers' Qwen2 tokenizer, the source of truth."""
    qwen2 = pytest.importorskip("transformers.models.qwen2.tokenization_qwen2")
    return qwen2.PRETOKENIZE_REGEX


def test_pattern_is_qwen2s(qwen2_pattern: str) -> None:
    assert qwen2_pattern == QWEN2_PRETOKENIZE_PATTERN


@pytest.fixture(scope="module")
def reference_dir(
    tmp_path_factory: pytest.TempPathFactory, tok: Qwen2VLTokenizer, qwen2_pattern: str
) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    ranks = tok._backend._ranks  # the same table the builtin tokenizer uses
    spell = tokmod._byte_to_unicode()

    def s(b: bytes) -> str:
        return "".join(spell[x] for x in b)

    merges = _recover_merges(ranks)
    bpe = models.BPE(
        vocab={s(t): r for t, r in ranks.items()},
        merges=[(s(a), s(b)) for a, b in merges],
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
    )
    ref = Tokenizer(bpe)
    ref.normalizer = normalizers.NFC()
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(qwen2_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(name, normalized=False, special=True) for name in SPECIAL_TOKENS])
    out = tmp_path_factory.mktemp("qwen2-vl-tokenizer")
    ref.save(str(out / "tokenizer.json"))
    (out / "merges.txt").write_text("\n".join(f"{s(a)} {s(b)}" for a, b in merges), encoding="utf-8")
    return out


def test_recovered_merges_match_released(reference_dir: Path) -> None:
    merges = (reference_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert len(merges) == 151_643 - 256
    # Lines of Qwen2's released merges.txt (after its "#version: 0.2" header).
    assert merges[:8] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t", "ĠĠĠĠ ĠĠĠĠ", "e r", "ĠĠ Ġ", "o n"]
    assert merges[-4:] == ["áķ ·", "âį ¨", "âº Ł", "â½ Ĺ"]
    assert merges[75243:75247] == ["Ġ#- }ĊĊ", "vid a", "s olver", "ĠMor ales"]
    assert {"ðĿ ĵĺ", "ð ĴĮ", "ðĲ ±ħ"} <= set(merges)


PARITY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'M sure we'LL see; they've gone, it's done.",
    "Qwen2-VL 是一个视觉语言模型。它可以理解图片和视频，并回答问题！（全角标点）",
    "日本語のテキストとカタカナ、ひらがな。한국어 문장도 있습니다. Русский текст. العربية. हिन्दी पाठ।",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\r\n",
    '{"key": [1, 2.5, -3e10], "nested": {"a": null}}\n<div class="x">&nbsp;</div>',
    "digits 0 12 345 6789 3.14159 1,000,000 ２０２４ ① ⅻ ٣",
    "   leading spaces\n\n\n   \n\t\t\ttabs   \r\n\r\n trailing   ",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇨🇳🏳️‍🌈 and symbols ∑∫√≠≤ ℝ 𝔸 𝟙 ©®™",
    unicodedata.normalize("NFD", "Tiếng Việt có dấu, café, naïve, Åström, 한국어"),
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Where?<|im_end|>\n<|im_start|>assistant\n"
    "<|object_ref_start|>the red triangle<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"
    "<|im_end|>\n",
    "<|im_end|>\u0338 <|quad_start|>(1,2),(3,4),(5,6),(7,8)<|quad_end|><|endoftext|>",
    "\u200b\u00a0\u3000\ufeff zero-width and odd spaces\u2028line\u2029para",
    "",
]


def test_parity_with_tokenizers_reference(tok: Qwen2VLTokenizer, reference_dir: Path) -> None:
    ref = Qwen2VLTokenizer.from_dir(reference_dir)
    assert ref.vocab_size == tok.vocab_size
    rng = random.Random(7)
    corpus = [*PARITY_CORPUS, Path(tokmod.__file__).read_text(encoding="utf-8")]
    corpus += [_random_text(rng, rng.randint(1, 300)) for _ in range(400)]
    corpus += [unicodedata.normalize("NFD", t) for t in corpus[-50:]]
    for text in corpus:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text[:80]
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for name, token_id in SPECIAL_TOKENS.items():
        assert ref.token_to_id(name) == token_id


def test_pickles_by_reloading_its_source(tok: Qwen2VLTokenizer, reference_dir: Path) -> None:
    assert pickle.loads(pickle.dumps(tok)) is tok
    ref = Qwen2VLTokenizer.from_dir(reference_dir)
    copy = pickle.loads(pickle.dumps(ref))
    assert copy.source == ref.source and copy.encode("héllo <|im_end|>") == ref.encode("héllo <|im_end|>")


def test_from_dir_refuses_foreign_special_ids(tmp_path: Path, reference_dir: Path) -> None:
    text = (reference_dir / "tokenizer.json").read_text(encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text(text.replace("<|image_pad|>", "<|img_pad|>"), encoding="utf-8")
    with pytest.raises(ValueError, match="<\\|image_pad\\|>"):
        Qwen2VLTokenizer.from_dir(tmp_path / "tokenizer.json")
