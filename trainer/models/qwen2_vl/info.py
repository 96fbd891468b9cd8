"""Parameter counts by part and training-memory estimates; both work on meta-device models (no allocation)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
