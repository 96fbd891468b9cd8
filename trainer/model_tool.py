"""`python -m trainer.model_tool`: the model commands behind `vlctl model ...`, run in a child process so the CLI
itself never imports torch (see trainer/contract.py). Prints one JSON object on stdout; user errors print one
line on stderr and exit with code 2.

    info SPEC                  parameters by part and training memory for a preset or a checkpoint directory
    generate PATH --image F --prompt T   greedy answer of a checkpoint to a prompt about an image
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.contract import EXIT_USER_ERROR, GenerateResult, ModelInfo

DTYPES = ("float32", "bfloat16")


def model_info(spec: str, *, zero_shards: int = 1) -> ModelInfo:
    from trainer.contract.memory import SNAPSHOT_BUFFERS, snapshot_bytes, training_memory
    from trainer.models.qwen2_vl import load_config, preset
    from trainer.models.qwen2_vl.info import count_parameters
    from trainer.models.qwen2_vl.weights import build_on_meta

    cfg = load_config(spec) if Path(spec).is_dir() else preset(spec)
    counts = count_parameters(build_on_meta(cfg))
    return ModelInfo(
        source=spec,
        parameters=counts.parts,
        total=counts.total,
        vision=counts.vision,
        text=counts.text,
        tied_embeddings=cfg.text.tie_word_embeddings,
        memory=[
            {
                "dtype": d,
                **training_memory(counts.total, param_dtype=d, zero_shards=zero_shards),
                # In-place recovery: own snapshot + a peer's replica, each double-buffered (host memory).
                "snapshots": SNAPSHOT_BUFFERS
                * snapshot_bytes(counts.total, param_dtype=d, zero_shards=zero_shards),
            }
            for d in DTYPES
        ],
    )


def generate_answer(
    path: str, *, image: str, prompt: str, max_new_tokens: int = 64, dtype: str = "float32"
) -> GenerateResult:
    import torch

    from trainer.data.chat import tokenize_chat
    from trainer.data.image import ImageProcessorConfig, load_image, preprocess_images
    from trainer.data.tokenizer import load_tokenizer
    from trainer.models.qwen2_vl import from_pretrained, generate

    model = from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    tokenizer = load_tokenizer(path if (Path(path) / "tokenizer.json").exists() else None)
    pixel_values, grid = preprocess_images([load_image(image)], ImageProcessorConfig())
    merge = model.cfg.vision.spatial_merge_size
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}
    ]
    ids, _ = tokenize_chat(
        messages,
        tokenizer,
        image_token_counts=[int(grid[0].prod()) // merge**2],
        video_token_counts=[],
        add_generation_prompt=True,
    )
    prompt_ids = torch.tensor([ids])
    out = generate(
        model,
        prompt_ids,
        pixel_values=pixel_values,
        image_grid_thw=grid,
        max_new_tokens=max_new_tokens,
        eos_token_ids=[model.cfg.eos_token_id, model.cfg.fill_token_id],
    )
    new = out[0, prompt_ids.shape[1] :].tolist()
    return GenerateResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=len(ids),
        new_tokens=len(new),
        image_grid_thw=grid[0].tolist(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.model_tool")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info")
    info.add_argument("spec")
    info.add_argument("--zero-shards", type=int, default=1)
    gen = sub.add_parser("generate")
    gen.add_argument("path")
    gen.add_argument("--image", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            if args.zero_shards < 1:
                raise ValueError("--zero-shards: must be at least 1")
            result: dict = dict(model_info(args.spec, zero_shards=args.zero_shards))
        else:
            if not Path(args.image).is_file():
                raise ValueError(f"--image: {args.image}: no such file")
            result = dict(
                generate_answer(
                    args.path,
                    image=args.image,
                    prompt=args.prompt,
                    max_new_tokens=args.max_new_tokens,
                    dtype=args.dtype,
                )
            )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
