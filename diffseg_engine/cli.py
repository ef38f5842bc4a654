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
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        from .errors import BackendError
        raise BackendError("this command needs PyTorch, which is not installed",
                           fix=f"pip install 'diffseg-engine[{extra}]' (CPU: pip install torch==2.13.0)")


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
    device: str = typer.Option("auto", help="auto (CUDA when PyTorch sees it) | cpu | cuda | cuda:N."),
    max_minutes: float = typer.Option(0.0, help="Stop after this many minutes of training, with a checkpoint "
                                                "(continue later with --resume); 0: no limit."),
    prediction: str = typer.Option("eps", help="Diffusion target: eps (the paper: noise, learned variance) | x0 "
                                               "(the mask's logit, loss MSE + BCE + Dice; few-step sampling)."),
    recycling: bool = typer.Option(False, "--recycling", help="x0 only: noise the model's own guess from pure noise "
                                                              "instead of the true mask (Fu et al. 2023)."),
    mask_scale: float = typer.Option(0.0, help="Masks at ±b in x_0 (0: the preset's values, ±1 or 0/1)."),
    empty_share: float = typer.Option(-1.0, help="Share of tumour-free slices per batch (negative: the preset's "
                                                 "tumour weighting)."),
    objective: str = typer.Option("diffusion", help="diffusion (the DDPM) | segmentation (a deterministic U-Net "
                                                    "of the same backbone: the baseline of the README's table)."),
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
        threads=threads, device=device, max_minutes=max_minutes, objective=objective,
        prediction=prediction, recycling=recycling, mask_scale=mask_scale, empty_share=empty_share)
    path = run_training(cfg, resume=resume, quiet=quiet)
    typer.echo(f"model written to {path}")


@app.command()
@_handle_errors
def export(
    model: Path = typer.Argument(..., help="Run folder, model.safetensors, or a paper-code checkpoint (.pt)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output .onnx (default: beside the weights)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                      help="Allow full unpickling of a .pt file (runs code from the file!)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Check ONNX Runtime against torch (max abs error)."),
    modalities: str = typer.Option("t1,t1ce,t2,flair", help="For .pt checkpoints: the image channels, in order."),
    num_heads: int = typer.Option(1, help="For .pt checkpoints: attention heads (not stored in the weights; "
                                          "the paper's README uses 1)."),
    triton_repo: Optional[Path] = typer.Option(None, "--triton-repo", help="Also write a Triton Inference Server "
                                               "model repository for the step graph here (MODEL may then be .onnx)."),
) -> None:
    """Export the denoising step (U-Net + fused update) to ONNX, with the model card inside."""
    if triton_repo is not None and model.suffix == ".onnx":  # an existing export: no torch needed
        _write_triton(model, triton_repo)
        return
    _need_torch("export")
    from .export.onnx_export import check_parity, export_onnx
    from .errors import ModelFileError
    weights = model / "model.safetensors" if model.is_dir() else model
    if weights.suffix in (".pt", ".pth"):
        from .export.paper_checkpoint import convert_checkpoint
        weights = convert_checkpoint(weights, weights.with_suffix(".safetensors"), trust_pickle=trust_pickle,
                                     num_heads=num_heads,
                                     modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()))
        typer.echo(f"converted {model} -> {weights}")
    elif weights.suffix != ".safetensors":
        raise ModelFileError("expected a run folder, a .safetensors file or a .pt checkpoint", path=model)
    target = out or weights.with_suffix(".onnx")
    export_onnx(weights, target)
    typer.echo(f"wrote {target}")
    if check:
        err = check_parity(weights, target)
        if err > 1e-4:
            raise ModelFileError(f"ONNX output differs from torch by {err:.2e} (> 1e-4)", path=target)
        typer.echo(f"parity: max |onnxruntime - torch| = {err:.2e}")
    if triton_repo is not None:
        _write_triton(target, triton_repo)


def _write_triton(onnx_path: Path, repo: Path) -> None:
    from .export.triton import write_triton_repository
    plan = onnx_path.with_suffix(".plan")  # a TensorRT engine built beside the ONNX file, if any
    for kind, folder in write_triton_repository(onnx_path, repo, plan=plan if plan.is_file() else None).items():
        typer.echo(f"wrote Triton model {folder} ({kind})")


@app.command()
@_handle_errors
def segment(
    inputs: List[Path] = typer.Argument(None, help="A case folder, a 3D NIfTI (single-modality model) or a 4D "
                                                   "NIfTI with modalities on the last axis; or a cohort: a folder "
                                                   "of case folders, or a text file listing cases."),
    modality: List[str] = typer.Option([], "--modality", "-m", help="NAME=PATH, repeated (flair=..., t1=...)."),
    out: Path = typer.Option(Path("diffseg-out"), "--out", "-o", help="Output folder."),
    model: Optional[Path] = typer.Option(None, "--model", help=".onnx or .safetensors (default: the shipped model)."),
    n: int = typer.Option(5, "--n", help="Ensemble size: samples per slice."),
    sampler: Optional[str] = typer.Option(None, help="ddpm (the paper's) | ddim (default: the model card's, "
                                                     "what the model was evaluated with)."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the card's for its sampler, else 25 "
                                                   "for ddpm, respaced, and 50 for ddim; 1000 is the paper's)."),
    eta: Optional[float] = typer.Option(None, help="DDIM eta (0: deterministic update; default: the card's)."),
    seed: int = typer.Option(0, help="Seed: same seed, same masks, whatever the batch size."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(0, help="Work items per engine call (0: from available memory)."),
    save_samples: bool = typer.Option(False, "--save-samples", help="Also write every member's mask (4D uint8)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results already in --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    num_parts: int = typer.Option(1, "--num-parts", help="Cohorts: split the cases into K parts (job arrays)."),
    part_id: int = typer.Option(0, "--part-id", help="Cohorts: segment part I (0..K-1) only."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS",
                                      help="Cohorts: run on Ray. local (a Ray instance on this machine), auto (the "
                                           "cluster started here with `ray start`) or ray://HOST:10001."),
) -> None:
    """Segment one case, or a cohort: ensemble mean, variance and mask NIfTI on the input grid, plus
    provenance JSON (and, for a cohort, cohort_summary.csv/.md).

    Options, the model card, the inputs and --out are all checked before the model is loaded. A run that is
    interrupted (Ctrl-C, kill, power loss) resumes when the same command is run again; in a cohort, cases
    already finished with the same parameters are skipped and a failed case does not stop the others.
    """
    from .backends.base import read_card
    _check_sampling_options(n=n, steps=steps, seed=seed, batch_size=batch_size, sampler=sampler, eta=eta,
                            backend=backend, device=device)
    from .sampler import chosen_plan
    from .segment import check_output, default_model, open_model, resolve_case, segment_case
    model_path = model or default_model()
    card = read_card(model_path)  # the card only: no session, no weights yet
    plan = chosen_plan(card, sampler, steps, eta)
    from .cohort import is_cohort_source
    if len(inputs or []) == 1 and not modality and is_cohort_source(inputs[0]):
        _segment_cohort(inputs[0], out, model_path, plan, n=n, seed=seed, batch_size=batch_size,
                        save_samples=save_samples, overwrite=overwrite, quiet=quiet, backend=backend, device=device,
                        num_parts=num_parts, part_id=part_id, ray=ray)
        return
    if num_parts != 1 or part_id != 0 or ray is not None:
        from .errors import UsageError
        raise UsageError("--num-parts, --part-id and --ray split a cohort; this input is one case",
                         fix="give a folder of case folders or a text file listing cases")
    case = resolve_case(list(inputs or []), modality, card)
    check_output(out, case, overwrite=overwrite)
    eng = open_model(model_path, backend, device)
    try:
        res = segment_case(case, eng, out, n=n, plan=plan, seed=seed, batch_size=batch_size, overwrite=overwrite,
                           quiet=quiet, save_samples=save_samples, command=" ".join(sys.argv))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: finished chunks are kept in {out}; run the same command again to resume", err=True)
        raise typer.Exit(130)
    if not quiet:
        t = res.provenance["timings"]
        typer.echo(f"{res.case_id}: {int(res.mask.sum())} tumour voxels; sampling {t['sampling_s']:.1f} s; "
                   f"wrote {', '.join(p.name for p in res.outputs.values())} to {out}")


def _segment_cohort(source: Path, out: Path, model_path: Path, plan, *, n: int, seed: int, batch_size: int,
                    save_samples: bool, overwrite: bool, quiet: bool, backend: str, device: str, num_parts: int,
                    part_id: int, ray: Optional[str]) -> None:
    from .cohort import RunSettings, segment_cohort
    from .errors import CasesFailedError
    settings = RunSettings(n=n, plan=plan, seed=seed, batch_size=batch_size, save_samples=save_samples,
                           overwrite=overwrite)
    res = segment_cohort(source, out, model_path, settings, backend=backend, device=device, num_parts=num_parts,
                         part_id=part_id, use_ray=ray is not None, ray_address=ray,
                         quiet=quiet, command=" ".join(sys.argv))
    counts = res.counts()
    typer.echo(f"{counts['done']} done, {counts['skipped']} skipped (finished before), {counts['failed']} failed; "
               f"summary: {res.summary['md']}")
    if res.failed:
        raise CasesFailedError(f"{len(res.failed)} of {len(res.statuses)} cases failed "
                               f"({', '.join(s.case_id for s in res.failed[:5])}{', ...' if len(res.failed) > 5 else ''})",
                               path=res.summary["csv"], fix="read each case's message there, fix it and rerun the "
                                                            "same command (finished cases are skipped)")


def _check_sampling_options(*, n: int, steps: Optional[int], seed: int, batch_size: int, sampler: Optional[str],
                            eta: Optional[float],
                            backend: str, device: str) -> None:
    """`UsageError` for option values that cannot work, before any file is opened (`options`)."""
    from .options import check_sampling_options
    check_sampling_options(n=n, steps=steps, seed=seed, batch_size=batch_size, sampler=sampler, eta=eta,
                           backend=backend, device=device)


@app.command()
@_handle_errors
def evaluate(
    data: Path = typer.Option(..., "--data", help="Folder of labelled cases (any layout of ../shared/data)."),
    out: Path = typer.Option(Path("diffseg-eval"), "--out", "-o", help="Report folder."),
    predictions: Optional[Path] = typer.Option(None, help="Score this existing prediction folder instead of segmenting."),
    model: Optional[Path] = typer.Option(None, "--model", help=".onnx or .safetensors (default: the shipped model)."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    n: int = typer.Option(5, "--n", help="Ensemble size."),
    sampler: Optional[str] = typer.Option(None, help="ddpm | ddim (default: the model card's)."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps (default: the card's, else 25 for ddpm, 50 for ddim)."),
    eta: Optional[float] = typer.Option(None, help="DDIM eta (default: the card's)."),
    seed: int = typer.Option(0, help="Seed."),
    batch_size: int = typer.Option(0, help="Work items per engine call (0: automatic)."),
    policy: str = typer.Option("brats", help="Empty-mask policy: brats (both empty: Dice 1, HD95 0; one empty: "
                                             "Dice 0, HD95 373.13) | nan (undefined values left out)."),
    sizes: Optional[str] = typer.Option(None, help="Ensemble sizes for the Dice-vs-N curve, e.g. 1,5,10."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Score segmentations against ground truth (the paper's per-slice protocol and 3D), with uncertainty metrics."""
    from .evaluate import evaluate_folder
    eng = plan = None
    if predictions is None:
        _check_sampling_options(n=n, steps=steps, seed=seed, batch_size=batch_size, sampler=sampler, eta=eta,
                                backend=backend, device=device)
        from .sampler import chosen_plan
        from .segment import open_model
        eng = open_model(model, backend, device)
        plan = chosen_plan(eng.card, sampler, steps, eta)
    res = evaluate_folder(data, out, predictions=predictions, backend=eng, plan=plan, n=n, seed=seed,
                          batch_size=batch_size, policy=policy,
                          ensemble_sizes=[int(k) for k in sizes.split(",")] if sizes else None,
                          overwrite=overwrite, quiet=quiet, command=" ".join(sys.argv))
    for k, p in res.reports.items():
        typer.echo(f"  {k:<10} {p}")


@app.command()
@_handle_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Output folder."),
    n: int = typer.Option(5, "--n", help="Ensemble size."),
    seed: int = typer.Option(0, help="Seed."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Segment the shipped demo FLAIR volume (BraTS 2020, TCGA-DU-7294) with the shipped default model."""
    from .segment import DEMO_INPUT, open_model, resolve_case, segment_case
    from .sampler import chosen_plan
    eng = open_model(None, "onnxruntime", "auto")
    case = resolve_case([DEMO_INPUT], [], eng.card)
    res = segment_case(case, eng, out, n=n, plan=chosen_plan(eng.card), seed=seed,
                       overwrite=True, quiet=quiet, command=" ".join(sys.argv))
    typer.echo(f"{res.case_id}: {int(res.mask.sum())} tumour voxels (mask > 0.5), "
               f"sampling {res.provenance['timings']['sampling_s']:.0f} s on {res.provenance['backend']['device']}")
    for k, p in res.outputs.items():
        typer.echo(f"  {k:<10} {p}")


def main(argv: Optional[List[str]] = None) -> None:
    app(args=argv, prog_name="diffseg-engine")


if __name__ == "__main__":
    main(sys.argv[1:])
