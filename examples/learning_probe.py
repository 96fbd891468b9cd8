"""The ViT-only probe behind docs/learning.md's choice of classifier for the vision bag loss.

Trains the `mini` vision encoder (and merger) alone to classify the direction of the synthetic videos from its
mean-pooled output, with one of four heads, and prints validation accuracy every 50 updates:

    linear     a learned 4-way linear layer
    fixed      fixed random class vectors, N(0, 1/hidden) (what trainer/parallel/vision_bag.py uses)
    lm_head    the model's lm_head rows of the four direction words (learned), no final norm
    lm_norm    the same after the LLM's final norm
    vocab_norm the whole vocabulary through the final norm and lm_head

    python examples/learning_probe.py fixed --lr 3e-3 --steps 400 --seed 0

It reads runs/learn/data (the data command in examples/learning.yaml). Batches of 32 training videos, Adam with
betas (0.9, 0.95), one thread is enough (about 10 s per 100 updates for the small heads).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from trainer.data.dataset import video_config_for
from trainer.data.formats import encode_sample, iter_jsonl
from trainer.data.image import ImageProcessorConfig
from trainer.data.tokenizer import load_tokenizer
from trainer.data.video import VideoConfig, preprocess_video
from trainer.models.qwen2_vl import Qwen2VL, preset

DIRECTIONS = ["left", "right", "up", "down"]
HEADS = ("linear", "fixed", "lm_head", "lm_norm", "vocab_norm")


def load(path: str, tokenizer) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    image_cfg, video_cfg = ImageProcessorConfig(), VideoConfig()
    out = []
    for sample in iter_jsonl(path):
        enc = encode_sample(
            sample,
            tokenizer=tokenizer,
            image_cfg=image_cfg,
            video_fn=lambda loaded, item: preprocess_video(loaded, video_config_for(video_cfg, item)),
        )
        label = DIRECTIONS.index(sample.meta["direction"])
        out.append((torch.from_numpy(enc.pixel_values_videos), torch.from_numpy(enc.video_grid_thw), label))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("head", choices=HEADS)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="runs/learn/data")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(None)
    train = load(f"{args.data}/train/video_qa.jsonl", tokenizer)
    val = load(f"{args.data}/val/video_qa.jsonl", tokenizer)
    model = Qwen2VL(preset("mini"))
    hidden = model.cfg.text.hidden_size
    ids = torch.tensor([tokenizer.encode(d)[0] for d in DIRECTIONS])
    linear = torch.nn.Linear(hidden, len(DIRECTIONS))
    fixed = torch.randn(len(DIRECTIONS), hidden, generator=torch.Generator().manual_seed(7)) * hidden**-0.5
    params = list(model.visual.parameters())
    params += list(linear.parameters()) if args.head == "linear" else []
    if args.head in ("lm_head", "lm_norm", "vocab_norm"):
        params += list(model.lm_head.parameters()) + list(model.model.norm.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.95))

    def logits(batch) -> torch.Tensor:
        pixels, grid = torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])
        features = model.visual(pixels, grid)
        pooled = torch.stack([f.mean(0) for f in features.split((grid.prod(-1) // 4).tolist())])
        if args.head == "linear":
            return linear(pooled)
        if args.head == "fixed":
            return pooled @ fixed.T
        normed = pooled if args.head == "lm_head" else model.model.norm(pooled)
        return model.lm_head(normed) if args.head == "vocab_norm" else model.lm_head(normed)[:, ids]

    def targets(batch) -> torch.Tensor:
        labels = torch.tensor([b[2] for b in batch])
        return ids[labels] if args.head == "vocab_norm" else labels

    rng, start = np.random.default_rng(args.seed), time.perf_counter()
    truth = torch.tensor([b[2] for b in val])
    for step in range(args.steps):
        batch = [train[i] for i in rng.choice(len(train), 32, replace=False)]
        loss = F.cross_entropy(logits(batch).float(), targets(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            with torch.no_grad():
                scores = logits(val)
                scores = scores[:, ids] if args.head == "vocab_norm" else scores
                accuracy = (scores.argmax(-1) == truth).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.3f}  val accuracy {accuracy:.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
