"""Numerical parity with transformers' Qwen2VLForConditionalGeneration (4.57.6, fp32, SDPA).

Position semantics: we check the ORIGINAL Qwen2-VL rule (text after a vision block of LLM grid (t, h', w')
starting at s continues at s + max(t, h', w')), which the released weights were trained and evaluated with.
transformers 4.45 to 4.57 implement that rule, so the reference here is pinned to 4.57; transformers 5 advances by
max(h', w') only, which differs for the video below (t=3 > h'=w'=2). `test_position_rule_on_long_video` also
checks the positions against values written out by hand, independently of any transformers release.
"""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import IMAGE_GRIDS, hf_model, mixed_batch, random_model, tiny, tiny_variants
from safetensors.torch import load_file, save_file

from trainer.models.qwen2_vl import CheckpointError, Qwen2VL, from_pretrained, generate, save_pretrained
from trainer.models.qwen2_vl.config import tiny_config
from trainer.models.qwen2_vl.weights import canonical_name

TOL = 1e-5


def valid_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits[mask.bool()]


@pytest.fixture(scope="module", params=[0, 1, 2], ids=["tiny", "wide-gqa3", "mqa-tied"])
def variant(request):
    return tiny_variants()[request.param]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, variant):
    path = tmp_path_factory.mktemp("hf")
    hf_model(variant).save_pretrained(path)
    return path


@pytest.mark.parametrize("left_pad", [False, True])
def test_logits_loss_and_grads_match_transformers(variant, hf_dir, left_pad):
    cfg = variant
    theirs = hf_model(cfg)
    ours = from_pretrained(hf_dir)
    batch = mixed_batch(cfg, left_pad=left_pad)

    ref = theirs(input_ids=batch.input_ids, labels=batch.labels, **batch.kwargs())
    out = ours(batch.input_ids, labels=batch.labels, **batch.kwargs())
    diff = valid_logits(out.logits, batch.attention_mask) - valid_logits(ref.logits, batch.attention_mask)
    assert diff.abs().max() < TOL
    assert abs(out.loss.item() - ref.loss.item()) < TOL

    ref.loss.backward()
    out.loss.backward()
    ref_grads = {canonical_name(n): p.grad for n, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name]
        if g_ref is None:  # e.g. pad-token embedding rows: untouched on both sides
            assert p.grad is None or not p.grad.any(), name
            continue
        assert torch.allclose(p.grad, g_ref, atol=TOL, rtol=1e-4), (name, (p.grad - g_ref).abs().max())


def test_reverse_direction_transformers_loads_our_save(tmp_path):
    import transformers

    cfg = tiny()
    ours = random_model(cfg, seed=3)
    save_pretrained(ours, tmp_path)
    theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="sdpa"
    )
    batch = mixed_batch(cfg, seed=5)
    with torch.no_grad():
        ref = theirs.eval()(input_ids=batch.input_ids, **batch.kwargs()).logits
        out = ours(batch.input_ids, **batch.kwargs()).logits
    assert (
        valid_logits(out, batch.attention_mask) - valid_logits(ref, batch.attention_mask)
    ).abs().max() < TOL


def test_tied_embeddings_round_trip(tmp_path):
    import transformers

    cfg = tiny_config()
    cfg.text.tie_word_embeddings = True
    ours = random_model(cfg, seed=1)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    save_pretrained(ours, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded = from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    batch = mixed_batch(cfg)
    with torch.no_grad():
        ref = theirs(input_ids=batch.input_ids, **batch.kwargs()).logits
        out = loaded(batch.input_ids, **batch.kwargs()).logits
    assert (
        valid_logits(out, batch.attention_mask) - valid_logits(ref, batch.attention_mask)
    ).abs().max() < TOL


def test_position_rule_on_long_video(variant, hf_dir):
    """A video with t=3 > h'=w'=2: text after it continues at s + 3, not s + 2."""
    cfg = variant
    theirs = hf_model(cfg)
    ours = from_pretrained(hf_dir)
    batch = mixed_batch(cfg)
    ref, ref_deltas = theirs.model.get_rope_index(
        batch.input_ids, batch.image_grid_thw, batch.video_grid_thw, batch.attention_mask
    )
    segs = torch.where(batch.attention_mask.bool(), 0, -1)
    pos, deltas = ours.positions(batch.input_ids, segs, batch.image_grid_thw, batch.video_grid_thw)
    assert torch.equal(pos, ref) and torch.equal(deltas, ref_deltas)
    # Row 1: 3 text tokens + <|vision_start|> at 0..3, video (3, 4, 4) -> LLM grid (3, 2, 2) at s=4.
    video = pos[:, 1, 4:16]
    assert video[0].tolist() == [4] * 4 + [5] * 4 + [6] * 4
    assert video[1].tolist() == [4, 4, 5, 5] * 3
    assert video[2].tolist() == [4, 5, 4, 5] * 3
    assert pos[:, 1, 16].tolist() == [7, 7, 7]  # <|vision_end|> at s + max(t, h', w') = 4 + 3


def test_generate_matches_transformers_greedy(variant, hf_dir):
    cfg = variant
    theirs = hf_model(cfg)
    ours = from_pretrained(hf_dir)
    batch = mixed_batch(cfg, left_pad=True)
    eos = [cfg.eos_token_id]
    ref = theirs.generate(
        input_ids=batch.input_ids,
        **batch.kwargs(),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=cfg.pad_token_id,
    )
    out = generate(ours, batch.input_ids, **batch.kwargs(), max_new_tokens=12, eos_token_ids=eos)
    assert out.shape[1] > batch.input_ids.shape[1]
    assert torch.equal(out, ref)


def test_generate_single_prompt_with_image(variant, hf_dir):
    cfg = variant
    theirs = hf_model(cfg)
    ours = from_pretrained(hf_dir)
    batch = mixed_batch(cfg)
    n = int(batch.attention_mask[0].sum())
    ids = batch.input_ids[:1, :n]
    n_img = sum(t * h * w for t, h, w in IMAGE_GRIDS[:2])
    kwargs = dict(pixel_values=batch.pixel_values[:n_img], image_grid_thw=batch.image_grid_thw[:2])
    ref = theirs.generate(
        input_ids=ids,
        **kwargs,
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=[-1],
        pad_token_id=cfg.pad_token_id,
    )
    out = generate(ours, ids, **kwargs, max_new_tokens=16, eos_token_ids=[-1])
    assert out.shape[1] == n + 16
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------------- checkpoint formats


def test_nested_config_and_new_key_names(variant, hf_dir, tmp_path):
    """The transformers-5 layout: nested text_config with rope_parameters, `dtype`, `model.language_model.*`."""
    raw = json.loads((hf_dir / "config.json").read_text())
    text = raw.pop("text_config")
    for key in list(raw):
        if key in text and key not in ("vision_config",):
            raw.pop(key)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": text.pop("rope_theta"),
        "mrope_section": text.pop("rope_scaling")["mrope_section"],
    }
    raw.update(
        text_config=text,
        dtype=raw.pop("torch_dtype", "float32"),
        tie_word_embeddings=variant.text.tie_word_embeddings,
    )
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        raw[key] = json.loads((hf_dir / "config.json").read_text())[key]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    state = load_file(hf_dir / "model.safetensors")
    renamed = {
        (
            "model.language_model." + k[6:]
            if k.startswith("model.")
            else "model." + k
            if k.startswith("visual.")
            else k
        ): v
        for k, v in state.items()
    }
    assert any(k.startswith("model.visual.") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors")
    a, b = from_pretrained(hf_dir), from_pretrained(tmp_path)
    assert a.cfg == b.cfg
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_sharded_save_and_load(tmp_path):
    cfg = tiny()
    ours = random_model(cfg)
    save_pretrained(ours, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = from_pretrained(tmp_path)
    for (ka, va), (kb, vb) in zip(ours.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_mismatched_checkpoint_names_every_problem(variant, hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    state = load_file(hf_dir / "model.safetensors")
    state.pop("model.norm.weight")
    state["model.extra.weight"] = torch.zeros(1)
    state["visual.merger.mlp.2.bias"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        from_pretrained(tmp_path)
    message = str(err.value)
    assert "model.norm.weight" in message and "model.extra.weight" in message
    assert "visual.merger.mlp.2.bias (3,)" in message and "\n" not in message


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        from_pretrained(tmp_path)


def test_vision_feature_count_mismatch_is_an_error():
    cfg = tiny()
    model = Qwen2VL(cfg)
    batch = mixed_batch(cfg)
    with pytest.raises(ValueError, match="pad tokens"):
        model(
            batch.input_ids[:, :-3], pixel_values=batch.pixel_values[:-4], image_grid_thw=batch.image_grid_thw
        )
