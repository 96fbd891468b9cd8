"""The model demo (`vlctl demo` until the training demo replaces it): the whole model path on a CPU in a minute.

1. Build the `demo` preset (the real tokenizer's vocabulary, a few narrow layers) and draw a synthetic image.
2. Render a grounding conversation with the Qwen2-VL chat template and the real tokenizer.
3. Fit the model to that one sample for a few dozen steps (loss on the answer only) to show gradients flow
   through the LLM, the merger and the ViT.
4. Save it as a Hugging Face checkpoint, load it back, check the logits are identical.
5. Ask the reloaded model where the shape is, with greedy decoding and the KV cache.

    python -m trainer.model_demo --out runs/demo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trainer.data.chat import tokenize_chat
from trainer.data.image import ImageProcessorConfig, preprocess_images
from trainer.data.tokenizer import load_tokenizer
from trainer.models.qwen2_vl import Qwen2VL, from_pretrained, generate, preset, save_pretrained
from trainer.models.qwen2_vl.info import count_parameters

QUESTION = "Where is the red triangle?"


def draw_sample(size: tuple[int, int] = (224, 168)) -> tuple[Image.Image, str]:
    """A red triangle on a blue background, and its grounding answer with the box normalised to [0, 1000)."""
    width, height = size
    image = Image.new("RGB", size, (40, 70, 160))
    x1, y1, x2, y2 = 130, 40, 200, 120
    ImageDraw.Draw(image).polygon([(x1, y2), ((x1 + x2) // 2, y1), (x2, y2)], fill=(220, 30, 30))
    box = [int(x1 / width * 1000), int(y1 / height * 1000), int(x2 / width * 1000), int(y2 / height * 1000)]
    answer = (
        f"<|object_ref_start|>the red triangle<|object_ref_end|>"
        f"<|box_start|>({box[0]},{box[1]}),({box[2]},{box[3]})<|box_end|>"
    )
    return image, answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.model_demo")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(0)
    started = time.perf_counter()

    cfg = preset("demo")
    model = Qwen2VL(cfg).train()
    counts = count_parameters(model)
    print(f"[1/5] demo model: {counts.total:,} parameters (vision {counts.vision:,}, text {counts.text:,})")

    tokenizer = load_tokenizer()
    image, answer = draw_sample()
    pixel_values, grid = preprocess_images([image], ImageProcessorConfig())
    num_image_tokens = int(grid[0].prod()) // cfg.vision.spatial_merge_size**2
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": "demo.png"}, {"type": "text", "text": QUESTION}],
        },
        {"role": "assistant", "content": answer},
    ]
    ids, labels = tokenize_chat(messages, tokenizer, image_token_counts=[num_image_tokens])
    supervised = sum(label != -100 for label in labels)
    print(
        f"[2/5] sample: {image.size[0]}x{image.size[1]} image -> grid {grid[0].tolist()} -> "
        f"{num_image_tokens} image tokens; {len(ids)} tokens, {supervised} supervised"
    )

    inputs = dict(pixel_values=pixel_values, image_grid_thw=grid)
    input_ids, label_ids = torch.tensor([ids]), torch.tensor([labels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(1, args.steps + 1):
        loss = model(input_ids, labels=label_ids, **inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            print(f"[3/5] step {step:3d}  loss {loss.item():.4f}")

    model.eval()
    save_pretrained(model, out / "model")
    reloaded = from_pretrained(out / "model").eval()
    with torch.no_grad():
        diff = (model(input_ids, **inputs).logits - reloaded(input_ids, **inputs).logits).abs().max().item()
    print(f"[4/5] saved {out / 'model'} in the Hugging Face format; reloaded logits differ by {diff:.1e}")
    if diff != 0.0:
        raise SystemExit("reloaded model differs from the saved one")

    prompt, _ = tokenize_chat(
        messages[:1], tokenizer, image_token_counts=[num_image_tokens], add_generation_prompt=True
    )
    new = generate(
        reloaded, torch.tensor([prompt]), **inputs, max_new_tokens=40, eos_token_ids=[cfg.eos_token_id]
    )[0, len(prompt) :]
    reply = tokenizer.decode(new.tolist(), skip_special_tokens=False).removesuffix("<|im_end|>")
    print(
        f"[5/5] Q: {QUESTION}\n      A: {reply}\n      truth: {answer}\n"
        f"      {'exact match' if reply == answer else 'differs'}; "
        f"demo took {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
