"""Parameter counts by part and training-memory estimates; both work on meta-device models (no allocation)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True)
class ParameterCounts:
    parts: dict[str, int]  # vision.patch_embed, vision.blocks, vision.merger, text.embed_tokens, ...

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def vision(self) -> int:
        return sum(n for k, n in self.parts.items() if k.startswith("vision."))

    @property
    def text(self) -> int:
        return self.total - self.vision


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Counts each tensor once, so a tied lm_head adds nothing."""
    parts: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        top, child = name.split(".")[:2]
        part = {"visual": "vision", "model": "text", "lm_head": "text"}[top]
        key = f"{part}.{'lm_head' if top == 'lm_head' else child}"
        parts[key] = parts.get(key, 0) + p.numel()
    return ParameterCounts(parts)


def training_memory(
    num_params: int, *, param_dtype: str = "bfloat16", trainable: int | None = None, zero_shards: int = 1
) -> dict[str, int]:
    """Bytes for weights, gradients and Adam state (fp32 master copy plus two moments when weights are half
    precision; two moments only in fp32). Optimizer state is divided over `zero_shards` ranks (ZeRO-1).
    Activations depend on batch shape and checkpointing and are not included."""
    trainable = num_params if trainable is None else trainable
    width = _BYTES[param_dtype]
    optimizer_per_param = 8 + (4 if width < 4 else 0)
    return {
        "weights": num_params * width,
        "gradients": trainable * width,
        "optimizer": trainable * optimizer_per_param // zero_shards,
    }
