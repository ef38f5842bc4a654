"""Scoring segmentations against ground truth: the machinery of the `evaluate` command, one module a noun.

Lowest first, each importing only those before it: `metrics` (overlap and surface distances), `calibration`,
`columns` (the per-case metrics, one table the reports are driven from), `uncertainty`, `protocol` (one case's
scores: per slice, per volume, ensemble-size curves), `predictions` (a folder of predictions, scored),
`figures`, `page`, `reports`. The segment-then-score loop is `pipeline.evaluate`, above this package.
Imports: numpy, scipy; `core`, `io`, `inputs`, `maps`. Never torch, never `pipeline`.
"""
from ..core.errors import BackendError

try:  # every module here scores through `metrics`, which needs scipy: say so once, as a DiffsegError
    from . import metrics as _metrics  # noqa: F401
except ImportError as _exc:
    raise BackendError(f"evaluation needs scipy, which cannot be imported ({_exc})", fix="pip install scipy") from None
