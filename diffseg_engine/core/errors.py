"""Errors a user can act on, and the one table that maps them to exit codes.

Owns: the `DiffsegError` hierarchy and `EXIT_CODES`. Every error names the file (or option) at fault and
the fix, on one line. Imports: the standard library only. Never torch.
"""
from __future__ import annotations


class DiffsegError(Exception):
    """Base class: a one-line, user-facing message. `exit_code` comes from `EXIT_CODES`."""

    kind = "error"
    summary = "other error"  # a few words for the exit-code list in `--help` and the README

    def __init__(self, message: str, *, path: object | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        self.message = message.rstrip(".")  # without the file and the fix
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(message.rstrip("."))
        if fix:
            parts.append(f". Fix: {fix.rstrip('.')}")
        super().__init__("".join(parts) + ".")

    @property
    def exit_code(self) -> int:
        """The code of the nearest class in `EXIT_CODES` along the class hierarchy."""
        return next(EXIT_CODES[c] for c in type(self).__mro__ if c in EXIT_CODES)


class UsageError(DiffsegError):
    """An option value that cannot work (`--n 0`, `--steps 2000`, ...)."""

    summary = "bad option value"


class InputImageError(DiffsegError):
    """An MR image that cannot be read or used (corrupt, truncated, wrong shape, NaN, bad affine)."""

    summary = "unusable input image"


class CropWindowError(InputImageError):
    """Brain voxels beyond the model's crop window: the network would not see them (`--force` segments the
    window anyway). Its own class so that `segment` can report a likelier cause first (a native head scan)."""


class MissingModalityError(DiffsegError):
    """A modality the model needs is missing, duplicated or ambiguous in the input."""

    summary = "missing modality"


class ModelFileError(DiffsegError):
    """A model file that is corrupt, tampered, untrusted or does not fit this engine."""

    summary = "bad model file"


class DatasetError(DiffsegError):
    """A training or evaluation folder with no usable cases."""

    summary = "no usable cases"


class OutputError(DiffsegError):
    """An output location that cannot be written, or already holds results."""

    summary = "output refused"


class OutputBusyError(OutputError):
    """Another run holds the lock on the same case's outputs in the same `--out` folder."""

    summary = "output busy (another run)"


class BackendError(DiffsegError):
    """A runtime backend that is not installed or cannot run here."""

    summary = "backend unavailable"


class ResourceError(DiffsegError):
    """Out of memory at batch size 1, disk full."""

    summary = "out of memory or disk"


class BatchMemoryError(ResourceError):
    """A backend ran out of memory on one batch. The sampler catches it, halves that chunk and retries; it
    reaches the user (as a `ResourceError`) only at batch size 1."""


class CasesFailedError(DiffsegError):
    """A cohort run finished, but some of its cases failed (each named in the cohort summary)."""
    summary = "some cases of a cohort failed"


#: One table: error kind -> process exit code. 1 is left to unexpected crashes, 2 to the CLI parser.
EXIT_CODES: dict[type[DiffsegError], int] = {
    DiffsegError: 3,
    UsageError: 2,
    InputImageError: 10,
    MissingModalityError: 11,
    ModelFileError: 12,
    DatasetError: 13,
    OutputError: 14,
    BackendError: 15,
    ResourceError: 16,
    BatchMemoryError: 16,
    OutputBusyError: 17,
    CasesFailedError: 18,
}


def exit_code_help() -> str:
    """One line per exit code, from `EXIT_CODES` (plus 0, 1, 2 and 130, which the CLI itself uses)."""
    codes: dict[int, list[str]] = {0: ["done"], 1: ["unexpected crash (a bug: please report it)"],
                                   2: ["bad option (parser or value)"]}
    for cls, code in EXIT_CODES.items():
        if cls.summary not in codes.setdefault(code, []) and code != 2:
            codes[code].append(cls.summary)
    codes[130] = ["interrupted (Ctrl-C: rerun the same command to resume)"]
    return "; ".join(f"{c} {', '.join(v)}" for c, v in sorted(codes.items()))
