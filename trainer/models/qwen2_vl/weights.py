"""Load and save Hugging Face Qwen2-VL checkpoint directories.

Accepted on load:
- config.json in the released flat layout (text fields at the top, `rope_scaling`) or the nested layout newer
  transformers writes (`text_config` / `vision_config`, `rope_parameters`, `dtype`);
- weights in `model.safetensors` or shards listed by `model.safetensors.index.json`;
- both key namings: `visual.*` / `model.*` (on disk since the release) and `model.visual.*` /
  `model.language_model.*` (the module tree of transformers >= 4.52);
- tied or untied `lm_head`.
Missing or unexpected keys and shape mismatches raise one `CheckpointError` that names them: nothing is ever
left at random initialisation. The model is built on the meta device and the tensors are assigned, so loading a
large checkpoint allocates each weight once.

Saved: the released flat config layout and on-disk key names, which every transformers release loads.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import _DTYPES, ENDOFTEXT_ID, Qwen2VLConfig, TextConfig, VisionConfig
from .model import Qwen2VL


class CheckpointError(ValueError):
    """A checkpoint directory that does not describe this model."""


_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
)
_VISION_FIELDS = (
    "depth",
    "embed_dim",
    "num_heads",
    "mlp_ratio",
    "patch_size",
    "temporal_patch_size",
    "spatial_merge_size",
    "hidden_size",
)
_TOKEN_FIELDS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_RENAMES = ((re.compile(r"^model\.visual\."), "visual."), (re.compile(r"^model\.language_model\."), "model."))


def config_from_hf(raw: dict, *, source: str = "config.json") -> Qwen2VLConfig:
    """Build our config from either HF config layout."""
    text = {**raw, **raw.get("text_config", {})}  # nested values win; flat files have no text_config
    vision = raw.get("vision_config", {})
    rope = text.get("rope_scaling") or text.get("rope_parameters") or raw.get("rope_parameters") or {}
    if "mrope_section" not in rope:
        raise CheckpointError(f"{source}: no mrope_section in rope_scaling / rope_parameters")
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (Qwen2-VL uses silu)")
    if text.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window is not supported (Qwen2-VL does not use it)")
    text_kwargs = {f: text[f] for f in _TEXT_FIELDS if f in text}
    if "rope_theta" in rope:
        text_kwargs["rope_theta"] = rope["rope_theta"]
    tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    vision_kwargs = {f: vision[f] for f in _VISION_FIELDS if f in vision}
    if "in_chans" in vision or "in_channels" in vision:
        vision_kwargs["in_channels"] = vision.get("in_chans", vision.get("in_channels"))
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    tokens = {f: raw.get(f, text.get(f)) for f in _TOKEN_FIELDS}
    if isinstance(tokens["eos_token_id"], list):
        tokens["eos_token_id"] = tokens["eos_token_id"][0]
    given = {k: v for k, v in tokens.items() if v is not None}
    if tokens["pad_token_id"] is None and text.get("vocab_size", TextConfig().vocab_size) <= ENDOFTEXT_ID:
        # No pad id in the file (the released ones carry none: their tokenizer pads with <|endoftext|>, our
        # default), and a vocabulary without <|endoftext|>: the model has no pad token.
        given["pad_token_id"] = None
    try:
        return Qwen2VLConfig(
            vision=VisionConfig(**vision_kwargs),
            text=TextConfig(
                **text_kwargs, mrope_section=tuple(rope["mrope_section"]), tie_word_embeddings=tie
            ),
            torch_dtype=dtype if dtype in _DTYPES else "bfloat16",
            **given,
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None


def config_to_hf(cfg: Qwen2VLConfig) -> dict:
    """The released flat layout, which the pinned transformers 4.57 and transformers 5.x both load.

    Two values are written with care:
    - `pad_token_id` only when the model has one (the config checks it is inside the vocabulary):
      transformers passes it to `nn.Embedding` as `padding_idx`, which refuses an index past the table.
    - `mlp_ratio` as an int when it is whole: transformers 5 validates the vision config strictly and rejects
      4.0 where it declares an int.
    """
    t, v = cfg.text, cfg.vision
    tokens = {f: getattr(cfg, f) for f in _TOKEN_FIELDS}
    pad = tokens.pop("pad_token_id")
    mlp_ratio = int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **{f: getattr(t, f) for f in _TEXT_FIELDS},
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "vision_config": {
            **{f: getattr(v, f) for f in _VISION_FIELDS},
            "mlp_ratio": mlp_ratio,
            "in_chans": v.in_channels,  # the released key
            "in_channels": v.in_channels,  # the key transformers reads
            "hidden_act": "quick_gelu",
            "model_type": "qwen2_vl",
        },
        **tokens,
        **({"pad_token_id": pad} if pad is not None else {}),
        "torch_dtype": cfg.torch_dtype,
    }


def load_config(path: str | os.PathLike) -> Qwen2VLConfig:
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{file}: not found (a Hugging Face checkpoint directory has a config.json)"
        ) from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: invalid JSON ({err})") from None
    return config_from_hf(raw, source=str(file))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def canonical_name(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def build_on_meta(cfg: Qwen2VLConfig) -> Qwen2VL:
    with torch.device("meta"):
        return Qwen2VL(cfg)


def from_pretrained(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Qwen2VL:
    """Load a checkpoint directory; `dtype` None keeps the stored dtype."""
    path = Path(path)
    cfg = load_config(path)
    model = build_on_meta(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.text.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state, unexpected, mismatched = {}, [], []
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = canonical_name(key)
                if name == "lm_head.weight" and cfg.text.tie_word_embeddings:
                    continue  # tied: the embedding is the head
                if name not in expected:
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(key)
                if tensor.shape != expected[name]:
                    mismatched.append(f"{key} {tuple(tensor.shape)} != {tuple(expected[name])}")
                    continue
                state[name] = tensor if dtype is None else tensor.to(dtype)
    missing = sorted(set(expected) - set(state) - {m.split(" ")[0] for m in mismatched})
    if missing or unexpected or mismatched:
        parts = [
            f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if items
        ]
        raise CheckpointError(f"{path}: checkpoint does not match the config: {'; '.join(parts)}")
    model.load_state_dict(state, strict=not cfg.text.tie_word_embeddings, assign=True)
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.init_rotary(torch.device(device))  # the one buffer, in no checkpoint
    return model


def save_pretrained(model: Qwen2VL, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors shards (with an index when there are several)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.text.tie_word_embeddings:
        state.pop("lm_head.weight")
    dtype = next(iter(state.values())).dtype
    dtype_name = next((n for n, d in _DTYPES.items() if d == dtype), model.cfg.torch_dtype)
    (path / "config.json").write_text(
        json.dumps(config_to_hf(model.cfg.replace(torch_dtype=dtype_name)), indent=2) + "\n"
    )
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
