"""The `edgeai` command. Each command calls one public function with the same parameter names;
heavy modules are imported inside the commands so that `edgeai --help` stays fast."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from edgeai.errors import EdgeAIError

app = typer.Typer(
    name="edgeai",
    help="Quantize, export and run language models on small machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(exc: BaseException) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def convert(
    src: Optional[Path] = typer.Argument(None, help="Hugging Face folder or .gguf file (default: the bundled SmolLM2)."),
    output: Path = typer.Option(..., "--output", "-o", help="GGUF file to write."),
    outtype: str = typer.Option("f16", "--outtype", help="f32, f16, bf16 or q8_0."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow PyTorch .bin checkpoints (weights_only=True)."),
    threads: int = typer.Option(0, "--threads", "-t", help="Quantization threads (0: all cores)."),
) -> None:
    """Convert a checkpoint to GGUF."""
    from edgeai.converters.convert import convert as run_convert

    try:
        path = run_convert(src, output, outtype=outtype, force=force, quiet=True if quiet else None,
                           trust_pickle=trust_pickle, threads=threads)
    except EdgeAIError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]interrupted:[/] {output} was not written")
        raise typer.Exit(130)
    if not quiet:
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@app.command()
def inspect(path: Path = typer.Argument(..., help="A .gguf file.")) -> None:
    """Show what an artifact holds."""
    from rich.console import Console
    from rich.table import Table

    from edgeai.inspect import describe

    try:
        s = describe(path)
    except EdgeAIError as exc:
        _fail(exc)
    console = Console()
    head = Table(title=f"{s.path.name}", show_header=False)
    head.add_row("architecture", s.architecture)
    head.add_row("name", s.name)
    head.add_row("tensors", f"{s.n_tensors}")
    head.add_row("parameters", f"{s.n_parameters:,}")
    head.add_row("tensor data", f"{s.n_bytes / 2**20:.2f} MiB")
    head.add_row("bits per weight", f"{s.bits_per_weight:.2f}")
    for k, v in s.other.items():
        head.add_row(k, str(v))
    console.print(head)

    hp = Table(title="hyper-parameters")
    hp.add_column("key")
    hp.add_column("value")
    for k, v in s.hparams.items():
        hp.add_row(k, str(v))
    console.print(hp)

    types = Table(title="tensors by type")
    for col in ("type", "tensors", "MiB", "bits/weight"):
        types.add_column(col, justify="right" if col != "type" else "left")
    for kind, st in s.types.items():
        types.add_row(kind, str(st.count), f"{st.n_bytes / 2**20:.2f}", f"{8 * st.n_bytes / max(1, st.n_elements):.2f}")
    console.print(types)

    tok = Table(title="tokenizer", show_header=False)
    for k, v in s.tokenizer.items():
        if v is not None:
            tok.add_row(k, str(v))
    console.print(tok)

    if s.recipe:
        rec = Table(title="recipe", show_header=False)
        for k, v in s.recipe.items():
            if k == "tensor_types":
                from collections import Counter

                v = ", ".join(f"{t}: {n}" for t, n in Counter(v.values()).most_common())
            elif k == "fallbacks":
                v = f"{len(v)} tensor(s)" + (f", e.g. {next(iter(v))}: {next(iter(v.values()))}" if v else "")
            rec.add_row(k, str(v))
        console.print(rec)


def main() -> None:
    """Entry point of the `edgeai` script."""
    try:
        app()
    except BrokenPipeError:  # `edgeai inspect ... | head`
        sys.stderr.close()


if __name__ == "__main__":
    main()
