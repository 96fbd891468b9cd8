"""Score a trained model on the synthetic grounding and video-direction questions, against chance.

    python -m trainer.evaluate RUN_DIR_OR_CHECKPOINT --data val/grounding.jsonl val/video_qa.jsonl

Prints one JSON object: per task the counts, the accuracy, the chance baselines and a p-value, and the training
loss curve read from the run's metrics-rank0.jsonl.

Decisions:

- Scored records are those whose `meta.task` is "grounding" (hit: the first box parsed from the answer has IoU
  > 0.5 with `meta.box`, both normalised to [0, 1000)) or "direction" (right: the first of left/right/up/down in
  the answer is `meta.direction`). Other records (captions, text) are counted as skipped. No parseable box or
  direction is a miss.
- Answers are greedy. The prompt is the conversation without its last (assistant) turn plus the generation
  prompt, tokenized by the chat code training uses, with vision inputs from `encode_sample` under the run's own
  pixel budgets (read from the checkpoint's training config), so the model sees what it was trained on.
- Chance is the best *constant* answer on the same val set, chosen with the val answers known: the majority
  direction's share, and the box on a 20-unit grid that hits the most truth boxes. No answer that ignores the
  input can do better, so beating it shows the model uses the image or video. Also reported: 1/4 for
  directions, the mean truth box, and "another sample's box" (every ordered pair of distinct val boxes: a guess
  drawn from the box prior). The p-value is the one-sided binomial tail of the hits under the chance rate.
- A checkpoint (a run folder, a checkpoint root or a step folder) goes through `trainer.checkpoint.export`
  into a temporary Hugging Face folder, the one tested conversion path; a Hugging Face folder loads directly.
- The loss curve keeps the last record of each step (a resume repeats steps). Single steps differ in their mix
  of tasks, so start and end are also given as means over the first and last five steps.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.grounding import NORM, box_iou, parse_boxes

DIRECTIONS = ("left", "right", "up", "down")
TASKS = ("grounding", "direction")
_DIRECTION = re.compile(r"\b(left|right|up|down)\b", re.IGNORECASE)
_ENDS = 5  # steps averaged for the start and end of the loss curve


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    data: Sequence[str]  # val JSONL files
    max_samples: int | None = None  # questions per task; None: all
    max_new_tokens: int = 40  # a box answer is about 23 tokens
    iou_threshold: float = 0.5
    box_grid: int = 20  # step of the grid searched for the best constant box

    def __post_init__(self) -> None:
        if isinstance(self.data, str) or not self.data:
            raise ValueError("data: give at least one JSONL file")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples: must be positive, got {self.max_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be positive, got {self.max_new_tokens}")
        if not 0 < self.iou_threshold < 1:
            raise ValueError(f"iou_threshold: must be in (0, 1), got {self.iou_threshold}")
        if not 1 <= self.box_grid <= NORM // 2:
            raise ValueError(f"box_grid: must be in [1, {NORM // 2}], got {self.box_grid}")


# ---------------------------------------------------------------------------------------------------- scoring


def answer_box(answer: str) -> tuple[int, int, int, int] | None:
    boxes = parse_boxes(answer)
    return boxes[0].box if boxes else None


def answer_direction(answer: str) -> str | None:
    found = _DIRECTION.search(answer)
    return found.group(1).lower() if found else None


def grounding_iou(answer: str, truth: Sequence[int]) -> float | None:
    """IoU of the answer's first box with the truth box; None when the answer holds no box."""
    box = answer_box(answer)
    return None if box is None else box_iou(box, truth)


def binomial_tail(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p): how likely chance alone scores this well."""
    if hits <= 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(hits, n + 1)))


def _iou_matrix(candidates: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """(C, 4) x (T, 4) boxes -> (C, T) IoU."""
    c, t = candidates[:, None, :], truths[None, :, :]
    w = np.clip(np.minimum(c[..., 2], t[..., 2]) - np.maximum(c[..., 0], t[..., 0]), 0, None)
    h = np.clip(np.minimum(c[..., 3], t[..., 3]) - np.maximum(c[..., 1], t[..., 1]), 0, None)
    inter = w * h
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    union = area(c) + area(t) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_baselines(
    truths: Sequence[Sequence[int]], *, threshold: float = 0.5, grid: int = 20
) -> dict[str, Any]:
    """Hit rates of image-blind answers on these truth boxes: the best constant box on a grid, the mean box, and
    another sample's box."""
    boxes = np.asarray(truths, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    if n == 0:
        return {}
    mean = np.round(boxes.mean(0)).astype(int)
    mean_hits = int((_iou_matrix(mean[None].astype(np.float64), boxes) > threshold).sum())
    pairs = _iou_matrix(boxes, boxes) > threshold
    other = (int(pairs.sum()) - n) / (n * (n - 1)) if n > 1 else 0.0  # drop the diagonal (a box with itself)
    # Every box with corners on the grid; scored in chunks of x-intervals to bound memory.
    edges = np.arange(0, NORM, grid, dtype=np.float64)
    lo, hi = np.triu_indices(len(edges), k=1)
    spans = np.stack([edges[lo], edges[hi]], 1)  # (S, 2) intervals
    best_rank, best_hits, best_box = -1.0, 0, None
    for x in spans:
        cand = np.concatenate([np.broadcast_to(x, spans.shape), spans], 1)[:, [0, 2, 1, 3]]  # (x1,y1,x2,y2)
        iou = _iou_matrix(cand, boxes)
        hits = (iou > threshold).sum(1)
        ranked = hits + 0.5 * iou.mean(1)  # ties in hits go to the higher mean IoU
        k = int(ranked.argmax())
        if ranked[k] > best_rank:
            best_rank, best_hits, best_box = ranked[k], int(hits[k]), [int(v) for v in cand[k]]
    return {
        "best_constant_box": {"box": best_box, "hits": best_hits, "accuracy": best_hits / n},
        "mean_box": {"box": mean.tolist(), "hits": mean_hits, "accuracy": mean_hits / n},
        "another_samples_box": {"accuracy": other},
    }


def direction_baselines(truths: Sequence[str]) -> dict[str, Any]:
    if not truths:
        return {}
    answer, count = Counter(truths).most_common(1)[0]
    return {
        "uniform": {"accuracy": 1 / len(DIRECTIONS)},
        "majority": {"answer": answer, "hits": count, "accuracy": count / len(truths)},
    }


def summarize(task: str, rows: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """Counts, accuracy, baselines and p-value of one task's scored rows ({truth, answer, hit, ...})."""
    n, hits = len(rows), sum(r["hit"] for r in rows)
    out: dict[str, Any] = {"n": n, "hits": hits, "accuracy": hits / n if n else None}
    out["unparsed"] = sum(r["parsed"] is None for r in rows)
    if task == "grounding":
        ious = [r["iou"] or 0.0 for r in rows]
        out["mean_iou"] = float(np.mean(ious)) if rows else None
        out["baselines"] = box_baselines(
            [r["truth"] for r in rows], threshold=cfg.iou_threshold, grid=cfg.box_grid
        )
        chance = out["baselines"].get("best_constant_box", {}).get("accuracy")
    else:
        out["baselines"] = direction_baselines([r["truth"] for r in rows])
        out["per_direction"] = {
            d: {
                "n": sum(r["truth"] == d for r in rows),
                "hits": sum(r["hit"] and r["truth"] == d for r in rows),
            }
            for d in DIRECTIONS
        }
        out["answers"] = dict(Counter(str(r["parsed"]) for r in rows))
        chance = out["baselines"].get("majority", {}).get("accuracy")
    out["chance"] = chance
    out["p_value"] = binomial_tail(hits, n, chance) if n and chance is not None else None
    return out


# ---------------------------------------------------------------------------------------------------- loss curve


def loss_curve(metrics_file: str | Path) -> dict[str, Any]:
    """The loss per step of a run's metrics-rank0.jsonl, its start and end, and the training time."""
    steps: dict[int, dict[str, Any]] = {}
    for line in Path(metrics_file).read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps[record["step"]] = record
    if not steps:
        raise ValueError(f"{metrics_file}: no step records with a loss")
    ordered = [steps[s] for s in sorted(steps)]
    losses = [r["loss"] for r in ordered]
    return {
        "steps": len(ordered),
        "first": losses[0],
        "last": losses[-1],
        "min": min(losses),
        f"first_{_ENDS}_mean": float(np.mean(losses[:_ENDS])),
        f"last_{_ENDS}_mean": float(np.mean(losses[-_ENDS:])),
        "train_seconds": float(sum(r.get("step_seconds", 0.0) for r in ordered)),
        "curve": [[r["step"], round(r["loss"], 4)] for r in ordered],
    }


# ---------------------------------------------------------------------------------------------------- the model


@dataclass(kw_only=True, slots=True)
class ModelSource:
    """What RUN_DIR_OR_CHECKPOINT named: a Hugging Face folder, or a checkpoint step with its training config."""

    path: str  # the Hugging Face folder or the step folder
    step: int | None = None
    train_config: dict[str, Any] = field(default_factory=dict)  # empty for a Hugging Face folder
    metrics: Path | None = None  # the run's metrics-rank0.jsonl, when found


def resolve_source(source: str) -> ModelSource:
    """A Hugging Face folder, a step folder, a checkpoint root or a run folder (its `checkpoints/`)."""
    from trainer.contract.checkpoint import latest_valid, read_meta

    where = Path(source)

    def metrics_in(run: Path) -> Path | None:
        return run / "metrics-rank0.jsonl" if (run / "metrics-rank0.jsonl").is_file() else None

    if (where / "config.json").is_file():
        return ModelSource(path=source, metrics=metrics_in(where))
    if (where / "meta.json").is_file():  # a step folder: RUN/checkpoints/step-N
        step_uri, run = source, where.parent.parent
    else:
        step_uri = None
        for root, run in ((where / "checkpoints", where), (where, where.parent)):  # noqa: B007 - used below
            if root.is_dir() and (found := latest_valid(str(root))) is not None:
                step_uri = found.uri
                break
    if step_uri is None:
        raise ValueError(f"{source}: neither a Hugging Face folder nor a run or checkpoint with a valid step")
    meta = read_meta(step_uri)
    return ModelSource(path=step_uri, step=meta["step"], train_config=meta["config"], metrics=metrics_in(run))


def load_model(source: ModelSource):
    """The model in float32 on CPU, in eval mode."""
    import torch

    from trainer.models.qwen2_vl import from_pretrained

    if not source.train_config:
        return from_pretrained(source.path, dtype=torch.float32).eval()
    from trainer.checkpoint.export import export_hf, model_config_of

    with tempfile.TemporaryDirectory(prefix="vlctl-eval-") as tmp:
        export_hf(source.path, tmp, config=model_config_of(source.path), dtype=torch.float32)
        return from_pretrained(tmp, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------------- answering


def questions(cfg: EvalConfig) -> tuple[list[tuple[str, Any]], int]:
    """((task, sample) of the scored records, at most max_samples per task, in file order; records skipped)."""
    from trainer.data.formats import ConversationSample, iter_jsonl

    taken: list[tuple[str, Any]] = []
    per_task: Counter[str] = Counter()
    skipped = 0
    for path in cfg.data:
        for sample in iter_jsonl(path):
            task = sample.meta.get("task")
            if task not in TASKS or not isinstance(sample, ConversationSample):
                skipped += 1
            elif cfg.max_samples is None or per_task[task] < cfg.max_samples:
                per_task[task] += 1
                taken.append((task, sample))
    return taken, skipped


def build_prompt(sample, *, tokenizer, image_cfg, video_cfg) -> tuple[list[int], Any]:
    """(prompt ids, the sample encoded for training): the conversation without its last (assistant) turn, with
    the generation prompt; the encoding supplies the vision inputs and their token counts."""
    from trainer.data.chat import tokenize_chat
    from trainer.data.dataset import video_config_for
    from trainer.data.formats import encode_sample, messages_as_dicts
    from trainer.data.video import preprocess_video

    messages = messages_as_dicts(sample)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{sample.source}: messages: the last turn must be the assistant's answer")
    encoded = encode_sample(
        sample,
        tokenizer=tokenizer,
        image_cfg=image_cfg,
        video_fn=lambda loaded, item: preprocess_video(loaded, video_config_for(video_cfg, item)),
    )
    merge = image_cfg.merge_size**2
    counts = lambda grids: [] if grids is None else [int(g.prod()) // merge for g in grids]  # noqa: E731
    ids, _ = tokenize_chat(
        messages[:-1],
        tokenizer,
        image_token_counts=counts(encoded.image_grid_thw),
        video_token_counts=counts(encoded.video_grid_thw),
        add_generation_prompt=True,
    )
    return ids, encoded


def answer(model, sample, *, tokenizer, image_cfg, video_cfg, max_new_tokens: int) -> str:
    """The model's greedy reply to the conversation without its last (assistant) turn."""
    import torch

    from trainer.models.qwen2_vl import generate

    ids, encoded = build_prompt(sample, tokenizer=tokenizer, image_cfg=image_cfg, video_cfg=video_cfg)
    tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    stop = (tokenizer.im_end_id, tokenizer.endoftext_id)
    out = generate(
        model,
        torch.tensor([ids]),
        pixel_values=tensor(encoded.pixel_values),
        image_grid_thw=tensor(encoded.image_grid_thw),
        pixel_values_videos=tensor(encoded.pixel_values_videos),
        video_grid_thw=tensor(encoded.video_grid_thw),
        max_new_tokens=max_new_tokens,
        eos_token_ids=stop,
    )[0, len(ids) :].tolist()
    ends = [k for k, t in enumerate(out) if t in stop]
    return tokenizer.decode(out[: ends[0]] if ends else out)


def score(task: str, reply: str, meta: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    if task == "grounding":
        iou = grounding_iou(reply, meta["box"])
        box = answer_box(reply)
        hit = iou is not None and iou > cfg.iou_threshold
        return {"truth": meta["box"], "parsed": box and list(box), "iou": iou, "hit": hit}
    parsed = answer_direction(reply)
    return {"truth": meta["direction"], "parsed": parsed, "hit": parsed == meta["direction"]}


def evaluate(source: ModelSource, cfg: EvalConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(report, per-question rows)."""
    from trainer.data.image import ImageProcessorConfig
    from trainer.data.tokenizer import load_tokenizer
    from trainer.data.video import VideoConfig

    data = source.train_config.get("data", {})
    image_cfg = ImageProcessorConfig(
        min_pixels=data.get("image_min_pixels", 3136), max_pixels=data.get("image_max_pixels", 12845056)
    )
    video_cfg = VideoConfig(max_video_tokens=data.get("max_video_tokens", 16384))
    tokenizer = load_tokenizer(data.get("tokenizer"))
    model = load_model(source)
    rows: list[dict[str, Any]] = []
    scored, skipped = questions(cfg)
    for task, sample in scored:
        reply = answer(
            model,
            sample,
            tokenizer=tokenizer,
            image_cfg=image_cfg,
            video_cfg=video_cfg,
            max_new_tokens=cfg.max_new_tokens,
        )
        rows.append({"id": sample.id, "task": task, "answer": reply, **score(task, reply, sample.meta, cfg)})
    report: dict[str, Any] = {"model": source.path, "step": source.step, "skipped_records": skipped}
    for task in TASKS:
        report[task] = summarize(task, [r for r in rows if r["task"] == task], cfg)
    report["loss"] = loss_curve(source.metrics) if source.metrics else None
    return report, rows


def to_json(report: dict[str, Any]) -> str:
    """Indented JSON with every list of numbers on one line (boxes, curve points)."""
    text = json.dumps(report, indent=2)
    return re.sub(r"\[\s+([-0-9.e, \n]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run folder, checkpoint root, step folder or Hugging Face folder")
    parser.add_argument("--data", nargs="+", required=True, help="val JSONL files (synthetic records)")
    parser.add_argument("--max-samples", type=int, default=None, help="questions per task (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--metrics", help="metrics-rank0.jsonl (default: found beside the checkpoints)")
    parser.add_argument("--answers", help="also write every question's answer and score here (JSONL)")
    args = parser.parse_args(argv)
    try:
        cfg = EvalConfig(data=args.data, max_samples=args.max_samples, max_new_tokens=args.max_new_tokens)
        for path in cfg.data:
            if not Path(path).is_file():
                raise ValueError(f"--data: {path}: no such file")
        source = resolve_source(args.source)
        if args.metrics:
            source.metrics = Path(args.metrics)
        report, rows = evaluate(source, cfg)
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if args.answers:
        Path(args.answers).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(to_json(report))
    for line in summary_lines(report):
        print(line, file=sys.stderr)
    return 0


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One human line per scored task and for the loss (the JSON on stdout has everything)."""
    lines = []
    for task, what in (("grounding", "boxes with IoU > 0.5"), ("direction", "directions right")):
        t = report.get(task) or {}
        if t.get("n"):
            lines.append(
                f"{task}: {t['hits']}/{t['n']} {what} ({t['accuracy']:.3f}) against chance {t['chance']:.3f}, "
                f"p = {t['p_value']:.1g}"
            )
    loss = report.get("loss") or {}
    if loss.get("steps"):
        lines.append(
            f"loss: {loss['first']:.3f} at step 1, {loss['last_5_mean']:.3f} over the last 5 of {loss['steps']} steps"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
