"""The `diffseg-engine` command line: thin Typer commands over the library.

Owns: argument parsing, the mapping of `DiffsegError` to one-line messages and exit codes (the table is
`errors.EXIT_CODES`), and lazy imports so that `segment` never imports torch. Nothing imports this module.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .errors import DiffsegError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Diffusion-model brain-tumour segmentation ensembles (Wolleb et al. 2022), fast.")


@app.callback()
def _root() -> None:
    """Diffusion-model brain-tumour segmentation ensembles (Wolleb et al. 2022), fast."""


def _handle_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffsegError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
    return wrapper


def _need_torch(extra: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        from .errors import BackendError
        raise BackendError(f"this command needs PyTorch, which is not installed",
                           fix=f"pip install 'diffseg-engine[{extra}]' (CPU: pip install torch==2.13.0)") from None


@app.command()
@_handle_errors
def train(
    data: Path = typer.Option(..., "--data", help="Folder of labelled BraTS cases (any layout of ../shared/data)."),
    out: Path = typer.Option(..., "--out", help="Run folder: model.safetensors, state, config, train_log.jsonl."),
    preset: str = typer.Option("cpu", help="Model size: paper | cpu | tiny."),
    modalities: Optional[str] = typer.Option(None, help="Comma-separated channel order, e.g. flair or t1,t1ce,t2,flair "
                                                        "(default: the preset's)."),
    steps: int = typer.Option(10_000, help="Total optimiser steps (with --resume: the new total)."),
    batch_size: int = typer.Option(0, help="Slices per step (0: the preset's)."),
    lr: float = typer.Option(0.0, help="Adam learning rate (0: the preset's, 1e-4 as the paper)."),
    ema_rate: float = typer.Option(0.0, help="EMA decay of the saved weights (0: the preset's)."),
    checkpoint_every: int = typer.Option(500, help="Save model + resumable state every N steps."),
    log_every: int = typer.Option(25, help="Write a train_log.jsonl line every N steps."),
    val_cases: Optional[str] = typer.Option(None, help="Comma-separated case IDs held out for validation."),
    val_count: int = typer.Option(-1, help="Number of patients held out (-1: about 1/6), when --val-cases is not given."),
    seed: int = typer.Option(0, help="Seed of the split, initialisation, batches and noise."),
    precision: str = typer.Option("auto", help="auto | bf16 | fp32. auto measures whether bf16 matmuls are faster on "
                                               "this machine (CPUs without bf16 units run them far slower)."),
    flip: bool = typer.Option(True, "--flip/--no-flip", help="Random left-right flips."),
    max_slices_per_case: int = typer.Option(0, help="Use at most N slices per case (0: all brain slices)."),
    threads: int = typer.Option(0, help="Torch threads (0: all cores)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out up to --steps."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a conditional DDPM that generates tumour masks (hybrid loss, EMA, periodic checkpoints)."""
    _need_torch("train")
    from .train.loop import TrainConfig, train as run_training
    cfg = TrainConfig(
        data=str(data), out=str(out), preset=preset,
        modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()) if modalities else (),
        steps=steps, batch_size=batch_size, lr=lr, ema_rate=ema_rate, checkpoint_every=checkpoint_every, log_every=log_every,
        val_cases=tuple(v.strip() for v in val_cases.split(",") if v.strip()) if val_cases else (),
        val_count=val_count, seed=seed, precision=precision, flip=flip, max_slices_per_case=max_slices_per_case,
        threads=threads)
    path = run_training(cfg, resume=resume, quiet=quiet)
    typer.echo(f"model written to {path}")


def main(argv: Optional[List[str]] = None) -> None:
    app(args=argv, prog_name="diffseg-engine")


if __name__ == "__main__":
    main(sys.argv[1:])
