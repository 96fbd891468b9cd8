"""The vision bag-of-answer-tokens loss: a direct learning signal for the vision encoder while the LLM is young.

Why: trained from random init, the LLM learns the answers' prior (formats, the most frequent direction) long
before any vision feature helps. Until then the only signal reaching the ViT is the answer loss seen through
random attention and projections, and once the prior is learned that signal fades (docs/learning.md measures it:
the ViT's gradient falls from 1.6 to about 1e-3, and direction and grounding stay at chance). This objective
gives each image and video its own loss, independent of the LLM's state.

What: each image or video's features (the merger output, one vector per LLM position) are mean-pooled and
scored against one fixed vector per vocabulary token, and asked to predict the tokens its sample is supervised
on, as a bag (order ignored): the cross-entropy averaged over those tokens, with the softmax over the tokens that
occur in the micro-batch's answers. It is classification with vocabulary tokens as labels, the idea behind
SuperClass (Huang et al., 2024, "Classification Done Right for Vision-Language Pre-Training"), which trains a
ViT to predict a caption's subword tokens. Answers of one or two words (a direction, a colour, a shape) become an
ordinary classification target; answers whose meaning lies in the order of their tokens (box coordinates) give
the bag only part of it.

The class vectors are fixed, not learned (a fixed classifier, as in Hoffer et al., 2018, "Fix your classifier"):
token t's vector is drawn from N(0, 1/hidden) by a generator seeded with t, so it is the same on every rank,
device and run, costs no parameters, no optimizer state and nothing in a checkpoint. Measured with a ViT-only
probe on the synthetic direction videos (examples/learning_probe.py; docs/learning.md has the table): fixed
random class vectors reached 0.6 validation accuracy after 150-200 updates, a learned 4-way linear head after
200-250, lm_head's rows after 300, and lm_head after the LLM's final norm or over the whole vocabulary not
within 400. In whole-model training lm_head's rows are also moved by the language-model loss, and the one run
scored against them stayed at chance for 400 steps.

The term is added on the last pipeline stage, so the config refuses pp > 1 with it on (stage 0 would have to
add it to its backward); tp and dp are fine.

Scaling: the term is the mean over every image and video of the global batch, times the configured weight, added
to the (already global-mean) language-model loss; so it too is independent of dp and the micro-batching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.models.qwen2_vl.model import IGNORE_INDEX, shifted_targets

SEED_BASE = 0x5EED_0000  # class vector of token t: generator seed SEED_BASE + t


def count_media(batch) -> int:
    """Images and videos in a micro-batch: the denominator of the bag loss's mean."""
    return sum(
        int(grid.shape[0])
        for key in ("image_grid_thw", "video_grid_thw")
        if (grid := batch.get(key)) is not None
    )


def class_vectors(tokens: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed class vector of each token: N(0, 1/dim) entries from a CPU generator seeded with the token id."""
    gen = torch.Generator()
    out = torch.empty(len(tokens), dim)
    for i, token in enumerate(tokens.tolist()):
        gen.manual_seed(SEED_BASE + token)
        out[i] = torch.randn(dim, generator=gen)
    return out.mul_(dim**-0.5)


def vision_bag_loss(
    vision: list[tuple[str, int, torch.Tensor, torch.Tensor]], batch, *, merge: int
) -> torch.Tensor:
    """Summed over the micro-batch's images and videos: the mean cross-entropy of predicting each one's sample's
    supervised tokens from its pooled features. `vision` is what `Qwen2VL.embed(vision_out=...)` collected."""
    input_ids, segment_ids = batch["input_ids"], batch["segment_ids"]
    # (B, L - 1): the token predicted at each position, ignored across sample boundaries.
    targets = shifted_targets(batch["labels"], segment_ids)
    supervised = targets != IGNORE_INDEX
    pooled, bags = [], []
    for _kind, token_id, features, grid in vision:
        sizes = (grid.prod(-1) // (merge * merge)).tolist()
        slots = (input_ids == token_id).nonzero()  # (N, 2): row, column; the order features were scattered in
        start = 0
        for item, size in zip(features.split(sizes), sizes, strict=True):
            row, col = slots[start].tolist()
            start += size
            seg = segment_ids[row]
            # The sample's supervised targets; a sample's own positions never predict another sample's tokens.
            mine = supervised[row] & (seg[:-1] == seg[col])
            pooled.append(item.mean(0))
            bags.append(targets[row][mine])
    if not pooled:
        return torch.zeros((), device=input_ids.device)
    candidates = torch.unique(torch.cat(bags))  # sorted
    features = torch.stack(pooled)
    vectors = class_vectors(candidates.cpu(), features.shape[-1]).to(features.device, features.dtype)
    logp = F.log_softmax((features @ vectors.T).float(), dim=-1)  # (items, candidates)
    total = logp.new_zeros(())
    for i, bag in enumerate(bags):
        if bag.numel():  # a sample cut before its answer has nothing to predict: it adds zero
            total = total - logp[i, torch.searchsorted(candidates, bag)].mean()
    return total
