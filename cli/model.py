"""`vlctl model`: inspect a preset or checkpoint, and ask a checkpoint about an image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from trainer.contract import MODEL_PRESETS
from trainer.contract.memory import human_bytes

from .output import OutputFormat, emit, human_count
from .tool import run_model_tool

app = typer.Typer(help="Inspect Qwen2-VL presets and checkpoints; generate answers.", no_args_is_help=True)

OutputOption = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="table for people, json for scripts")
]


def _info_table(info: dict) -> Table:
    table = Table(
        title=f"{info['source']}: {human_count(info['total'])} parameters "
        f"({'tied' if info['tied_embeddings'] else 'untied'} embeddings)"
    )
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for part, n in info["parameters"].items():
        table.add_row(part, f"{n:,}")
    table.add_row("vision total", f"{info['vision']:,}", style="bold")
    table.add_row("text total", f"{info['text']:,}", style="bold")
    table.add_row("total", f"{info['total']:,}", style="bold")
    table.add_section()
    for m in info["memory"]:
        table.add_row(
            f"memory {m['dtype']}: weights / grads / Adam",
            f"{human_bytes(m['weights'])} / {human_bytes(m['gradients'])} / {human_bytes(m['optimizer'])}",
        )
    for m in info["memory"]:
        if "snapshots" in m:  # host memory a rank adds under `recovery: in-place`
            table.add_row(f"in-place snapshots {m['dtype']} (own + peer's, x2)", human_bytes(m["snapshots"]))
    return table


@app.command()
def info(
    spec: Annotated[
        str, typer.Argument(help=f"a preset ({', '.join(MODEL_PRESETS)}) or a checkpoint directory")
    ],
    zero_shards: Annotated[
        int, typer.Option(help="data-parallel ranks sharing optimizer state (ZeRO-1)")
    ] = 1,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Parameters by part and training memory (weights, gradients, Adam states) per dtype; no weights are read."""
    emit(run_model_tool("info", spec, "--zero-shards", str(zero_shards)), output, _info_table)


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="a Hugging Face checkpoint directory")],
    image: Annotated[Path, typer.Option(help="the image to ask about")],
    prompt: Annotated[str, typer.Option(help="the question")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32",
    output: OutputOption = OutputFormat.table,
) -> None:
    """Greedy answer of the model at PATH to PROMPT about IMAGE."""
    result = run_model_tool(
        "generate",
        str(path),
        "--image",
        str(image),
        "--prompt",
        prompt,
        "--max-new-tokens",
        str(max_new_tokens),
        "--dtype",
        dtype,
    )
    emit(result, output, lambda r: r["text"])


@app.command()
def demo(
    out: Annotated[str, typer.Option(help="folder for the demo's files")] = "runs/model-demo",
) -> None:
    """The model alone: build the demo model, fit it to a synthetic grounding sample, save it in the Hugging
    Face format, reload it and ask it about the image (about a minute)."""
    import subprocess
    import sys

    from .errors import EXIT_FAILURE, CliError

    code = subprocess.call([sys.executable, "-m", "trainer.model_demo", "--out", out])
    if code != 0:
        raise CliError(f"model demo failed with exit code {code}; see the output above", EXIT_FAILURE)
