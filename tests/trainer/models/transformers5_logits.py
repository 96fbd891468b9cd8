"""Test helper: load a checkpoint folder with transformers 5 and write its logits, started by test_hf_save.py.

    PYTHONPATH=.cache/transformers5 python transformers5_logits.py CHECKPOINT BATCH OUT

A separate process because the tests pin transformers 4.57 in the venv; transformers 5 sits in its own folder
(the Makefile's venv recipe installs it there) and must not be imported next to 4.57. BATCH is a `torch.save`d
dict of the model inputs; OUT gets {"version", "pad_token_id", "padding_idx", "logits"} via `torch.save`.
Imports only torch and transformers, never the project, so the code under test cannot leak into the reference.
"""

from __future__ import annotations

import sys

import torch
import transformers


def main(checkpoint: str, batch_file: str, out_file: str) -> None:
    if not transformers.__version__.startswith("5."):
        raise SystemExit(
            f"expected transformers 5.x, imported {transformers.__version__} from {transformers.__file__}"
        )
    batch = torch.load(batch_file, weights_only=True)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        checkpoint, attn_implementation="sdpa"
    )
    ids = batch["input_ids"]
    # transformers 5 no longer infers which tokens are vision placeholders; its processor passes this map
    # (0 text, 1 image, 2 video) and the model refuses vision inputs without it.
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == model.config.image_token_id] = 1
    types[ids == model.config.video_token_id] = 2
    with torch.no_grad():
        logits = model.eval()(**batch, mm_token_type_ids=types).logits
    embed = model.get_input_embeddings()
    torch.save(
        {
            "version": transformers.__version__,
            "pad_token_id": model.config.get_text_config().pad_token_id,
            "padding_idx": embed.padding_idx,
            "logits": logits,
        },
        out_file,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
