"""Shared pieces of the parallel-engine tests: synthetic multimodal packed rows, and real multi-process runs.

Rows pack several samples of random text with image (t=1) or video (t=2) pad runs whose counts match random pixel
grids; labels cover each sample's answer part, drawn from 16 token ids so the loss visibly falls; the row is padded to a fixed length (segment -1). A run starts one
process per rank (gloo on 127.0.0.1, OMP_NUM_THREADS=1), trains the tiny model for some steps on the same global
batches whatever the layout, and returns what each rank recorded.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import torch

from trainer.models.qwen2_vl.config import tiny_config

ROW_LEN = 48
REPO = Path(__file__).resolve().parents[3]


def model_config(**changes):
    return tiny_config().replace(**changes) if changes else tiny_config()


def _sample(rng: np.random.Generator, cfg) -> dict:
    text = lambda n: rng.integers(0, cfg.text.vocab_size - 16, n)  # noqa: E731 - below the special ids
    kind = rng.choice(["none", "image", "video"], p=[0.2, 0.5, 0.3])
    prompt = list(text(int(rng.integers(2, 5))))
    pixels, grid = None, None
    if kind != "none":
        t = 1 if kind == "image" else 2
        h, w = (int(x) for x in rng.choice([2, 4], 2))
        grid = (t, h, w)
        pad = cfg.image_token_id if kind == "image" else cfg.video_token_id
        pixels = rng.standard_normal((t * h * w, cfg.vision.patch_dim)).astype(np.float32)
        prompt += [cfg.vision_start_token_id] + [pad] * (t * h * w // 4) + [cfg.vision_end_token_id]
    answer = list(rng.integers(0, 16, int(rng.integers(3, 9))))  # a small answer vocabulary: learnable
    ids = np.array(prompt + answer, dtype=np.int64)
    labels = np.array([-100] * len(prompt) + answer, dtype=np.int64)
    return dict(ids=ids, labels=labels, kind=kind, pixels=pixels, grid=grid)


def make_row(rng: np.random.Generator, cfg, row_len: int = ROW_LEN) -> dict:
    ids, labels, segs = [], [], []
    vision = {"image": ([], []), "video": ([], [])}
    while True:
        s = _sample(rng, cfg)
        if len(ids) + len(s["ids"]) > row_len:
            if ids:
                break
            continue
        segs += [segs[-1] + 1 if segs else 0] * len(s["ids"])
        ids += list(s["ids"])
        labels += list(s["labels"])
        if s["kind"] != "none":
            vision[s["kind"]][0].append(s["pixels"])
            vision[s["kind"]][1].append(s["grid"])
    pad = row_len - len(ids)
    row = {
        "input_ids": torch.tensor(ids + [cfg.pad_token_id] * pad),
        "labels": torch.tensor(labels + [-100] * pad),
        "segment_ids": torch.tensor(segs + [-1] * pad),
    }
    for kind, (px, grids) in vision.items():
        name = "pixel_values" if kind == "image" else "pixel_values_videos"
        row[name] = torch.from_numpy(np.concatenate(px)) if px else None
        row[f"{kind}_grid_thw"] = torch.tensor(grids, dtype=torch.int64) if grids else None
    return row


def collate(rows: list[dict]) -> dict:
    out = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "segment_ids")}
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [r[name] for r in rows if r[name] is not None]
        if parts:
            out[name] = torch.cat(parts)
    return out


def global_batches(cfg, steps: int, rows_per_step: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    return [[make_row(rng, cfg) for _ in range(rows_per_step)] for _ in range(steps)]


def rank_micro_batches(rows: list[dict], dp_rank: int, dp: int, micro_rows: int) -> list[dict]:
    """This dp rank's contiguous share of a step's global rows, in micro-batches."""
    per_rank = len(rows) // dp
    mine = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [collate(mine[i : i + micro_rows]) for i in range(0, per_rank, micro_rows)]


# ------------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
    )
    torch.set_num_threads(1)


def spawn(worker, world: int, out_dir: Path, *args) -> list:
    """Run worker(rank, world, port, out_dir, *args) in `world` fresh processes; each returns a picklable result,
    written to out_dir and returned in rank order.

    The processes fork from a forkserver that has imported torch (and its compiler stack, which every optimizer
    constructor imports) once per test session: a clean process without paying seconds of imports per rank."""
    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["parallel_harness", "torch._dynamo", "trainer.parallel"])
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(
        _entry,
        args=(worker, world, free_port(), out_dir, args),
        nprocs=world,
        start_method="forkserver",
        join=True,
    )
    return [pickle.loads((out_dir / f"rank{r}.pkl").read_bytes()) for r in range(world)]


def _entry(rank: int, worker, world: int, port: int, out_dir: Path, args: tuple) -> None:
    set_env(rank, world, port)
    from trainer.parallel import destroy_distributed

    try:
        result = worker(rank, world, port, out_dir, *args)
    finally:
        destroy_distributed()
    (out_dir / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


# -------------------------------------------------------------------------------------------- training run


def build(dims, options: dict):
    """The engine every test trains (tiny model, seed 0, AdamW with warm-up, cosine, weight decay and clipping),
    the global batches of the run, and the rows per micro-batch. With options["meta"] the engine is built from
    the model config (on the meta device) and the same weights are loaded afterwards, whole, as pretrained
    weights would be."""
    from trainer.models.qwen2_vl import Qwen2VL
    from trainer.parallel import EngineConfig, OptimizerConfig, ParallelEngine, build_engine, init_distributed
    from trainer.parallel import micro_batches_per_step as accumulation

    cfg = model_config(**options.get("model", {}))
    steps, rows, micro = options.get("steps", 10), options.get("rows", 4), options.get("micro", 1)
    opt = OptimizerConfig(
        lr=2e-3, min_lr=2e-4, warmup_steps=2, total_steps=steps, weight_decay=0.1, grad_clip=1
    )
    config = EngineConfig(
        optimizer=opt,
        micro_batch_rows=micro,
        num_micro_batches=accumulation(rows_per_step=rows, dp=dims.dp, micro_batch_rows=micro),
        **options.get("engine", {}),
    )
    torch.manual_seed(0)
    if options.get("meta"):
        engine = build_engine(cfg, dims, config)
        torch.manual_seed(0)
        engine.load_model_state_dict(Qwen2VL(cfg).state_dict())
    else:
        engine = ParallelEngine(Qwen2VL(cfg), init_distributed(dims), config)
    return engine, global_batches(cfg, steps, rows), micro


def step_inputs(engine, rows: list[dict], micro_rows: int) -> list[dict]:
    dims, coords = engine.mesh.dims, engine.mesh.coords
    return rank_micro_batches(rows, coords.dp, dims.dp, micro_rows)


def train(rank, world, port, out_dir, dims_kw: dict, options: dict) -> dict:
    """Train at the given layout on the shared global batches; record per-step results and the state layout."""
    from trainer.parallel import ParallelDims

    engine, batches, micro_rows = build(ParallelDims(**dims_kw), options)
    hook = options.get("perturb")
    if hook is not None:
        hook(engine)
    params = dict(engine.stage.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    results = [engine.train_step(step_inputs(engine, rows, micro_rows)) for rows in batches]
    trainable = set(engine.trainable_names())
    return {
        "coords": tuple(engine.mesh.coords),
        "losses": [r.loss for r in results],
        "vision_bag_losses": [r.vision_bag_loss for r in results],
        "grad_norms": [r.grad_norm for r in results],
        "num_tokens": [r.num_tokens for r in results],
        "optimizer_numel": engine.optimizer_state_numel(),
        "trainable_numel": sum(params[n].numel() for n in trainable),
        "trainable": sorted(trainable),
        "changed": sorted(n for n, p in params.items() if not torch.equal(before[n], p.detach())),
        "fragments": engine.optimizer_fragments(),
        "replicated_in_sync": _in_sync(engine),
        "stage_layers": list(engine.layer_split[engine.mesh.stage]),
    }


def _in_sync(engine) -> bool:
    from trainer.parallel.tensor import replicated_in_sync

    return replicated_in_sync(engine.replicated, engine.mesh.tp_group)


def _key(options: dict) -> str:
    return hashlib.sha1(repr(sorted(options.items())).encode()).hexdigest()[:10]


def run(tmp_root: Path, dims_kw: dict, options: dict | None = None) -> list[dict]:
    """Train at a layout (dp, tp, pp keywords); results per rank."""
    options = options or {}
    world = dims_kw.get("dp", 1) * dims_kw.get("tp", 1) * dims_kw.get("pp", 1)
    name = "-".join(f"{k}{v}" for k, v in sorted(dims_kw.items())) or "single"
    return spawn(train, world, tmp_root / f"{name}-{_key(options)}", dims_kw, options)


def reference(tmp_path_factory, options: dict | None = None) -> dict:
    """The single-process run on the same global batches, computed once per test session."""
    options = options or {}
    cached = tmp_path_factory.getbasetemp() / "parallel-reference" / f"{_key(options)}.pkl"
    if not cached.exists():
        result = run(cached.parent, {}, options)[0]
        cached.write_bytes(pickle.dumps(result))
    return pickle.loads(cached.read_bytes())
