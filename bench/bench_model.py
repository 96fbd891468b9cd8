"""Forward+backward throughput of the vlctl Qwen2-VL against transformers' (4.57, SDPA) on CPU, and packed rows
against a padded batch.

Both models get the same weights and the same batch: four samples of different text lengths, each with an image
of a different size and aspect ratio. Throughput counts LLM tokens that are not padding (text and vision), so a
padded batch is charged for the compute its padding wastes. Every figure is a median over repetitions after a
warm-up, measured in this process, and reported as a ratio against its baseline.

    .venv/bin/python -m bench bench_model [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainer.models.qwen2_vl import Qwen2VL
from trainer.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from trainer.models.qwen2_vl.weights import canonical_name, config_to_hf

# (text tokens before, image grid (t, h, w) in patches, text tokens after): sizes like 224x224, 448x336, ...
SAMPLES = [(40, (1, 16, 16), 20), (200, (1, 32, 24), 60), (30, (1, 8, 40), 10), (500, (1, 24, 24), 120)]


def bench_config() -> Qwen2VLConfig:
    vocab = 8192
    return Qwen2VLConfig(
        vision=VisionConfig(depth=4, embed_dim=256, num_heads=4, hidden_size=512),
        text=TextConfig(
            vocab_size=vocab,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            mrope_section=(8, 12, 12),
            tie_word_embeddings=False,
        ),
        image_token_id=vocab - 1,
        video_token_id=vocab - 2,
        vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4,
        bos_token_id=vocab - 5,
        eos_token_id=vocab - 6,
        pad_token_id=vocab - 5,
        torch_dtype="float32",
    )


def make_samples(cfg: Qwen2VLConfig, samples) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows, pixels = [], []
    for before, (t, h, w), after in samples:
        rows.append(
            torch.randint(0, 8000, (before,), generator=g).tolist()
            + [cfg.vision_start_token_id]
            + [cfg.image_token_id] * (t * h * w // 4)
            + [cfg.vision_end_token_id]
            + torch.randint(0, 8000, (after,), generator=g).tolist()
        )
        pixels.append(torch.randn(t * h * w, cfg.vision.patch_dim, generator=g))
    return rows, torch.cat(pixels), torch.tensor([grid for _, grid, _ in samples])


def supervise_text(cfg, ids: torch.Tensor) -> torch.Tensor:
    """Labels as real data has them: text supervised, vision pads never."""
    return ids.masked_fill((ids == cfg.image_token_id) | (ids == cfg.pad_token_id), -100)


def padded(cfg, rows):
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), cfg.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, supervise_text(cfg, ids)


def packed(cfg, rows):
    ids = torch.tensor([t for row in rows for t in row])[None]
    segments = torch.tensor([i for i, row in enumerate(rows) for _ in row])[None]
    return ids, segments, supervise_text(cfg, ids)


def timed_interleaved(steps: dict, reps: int) -> dict[str, float]:
    """Median seconds per step of each variant. Variants alternate within every repetition, so a change in
    machine load hits all of them alike instead of biasing whichever ran during it."""
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv or [])
    import transformers

    torch.manual_seed(0)
    reps = 2 if args.quick else 5
    cfg = bench_config()
    ours = Qwen2VL(cfg).train()
    hf_cfg = transformers.Qwen2VLConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    theirs = transformers.Qwen2VLForConditionalGeneration(hf_cfg).train()
    theirs.load_state_dict({k: ours.state_dict()[canonical_name(k)] for k in theirs.state_dict()})

    rows, pixel_values, grids = make_samples(cfg, SAMPLES)
    real_tokens = sum(map(len, rows))
    ids, mask, labels = padded(cfg, rows)

    def step_theirs():
        theirs.zero_grad(set_to_none=True)
        theirs(
            input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixel_values, image_grid_thw=grids
        ).loss.backward()

    def step_ours(ids, labels, *, full_logits: bool = False, **kw):
        ours.zero_grad(set_to_none=True)
        ours(
            ids,
            labels=labels,
            pixel_values=pixel_values,
            image_grid_thw=grids,
            return_logits=full_logits,
            **kw,
        ).loss.backward()

    p_ids, p_segments, p_labels = packed(cfg, rows)
    t = timed_interleaved(
        {
            "theirs": step_theirs,
            "full_logits": lambda: step_ours(ids, labels, attention_mask=mask, full_logits=True),
            "padded": lambda: step_ours(ids, labels, attention_mask=mask),
            "packed": lambda: step_ours(p_ids, p_labels, segment_ids=p_segments),
        },
        reps,
    )
    result = {
        "tokens": real_tokens,
        "padded_tokens": int(ids.numel()),
        "transformers_tokens_per_s": round(real_tokens / t["theirs"], 1),
        "vlctl_full_logits_tokens_per_s": round(real_tokens / t["full_logits"], 1),
        "vlctl_padded_tokens_per_s": round(real_tokens / t["padded"], 1),
        "vlctl_packed_tokens_per_s": round(real_tokens / t["packed"], 1),
        # Same padded batch, each model's training step (vlctl projects only supervised positions).
        "ratio": round(t["theirs"] / t["padded"], 3),
        # Same padded batch with vlctl also building the full (B, L, V) logits, as transformers does.
        "ratio_full_logits": round(t["theirs"] / t["full_logits"], 3),
        "packing_ratio": round(t["padded"] / t["packed"], 3),  # vlctl packed rows vs vlctl padded batch
        "threads": torch.get_num_threads(),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
