"""The per-case metrics of an evaluation: one declarative table that the reports are all driven from.

Owns: `Metric`, `METRICS` (in the order of the per-case CSV), `GROUPS` (the summary parts metrics are averaged
into), `row` (one case's values), `group_means` and `mean_std`. Adding a per-case metric is one entry in
`METRICS`: it becomes a column of ``evaluation_cases.csv``, a key of each ``per_case`` row of the JSON summary,
its mean in the summary part its `group` names, and -- where it names a `column` -- a column of the Markdown
per-case table (and with a `mean_column`, of the Markdown table of its group's means).
Imports: numpy. Never torch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

#: The summary parts per-case metrics are averaged into (over the scored cases, non-finite values left out),
#: and what is written for each metric: the mean alone under its key, or <key>_mean, <key>_std and <key>_n.
GROUPS = {"volume_3d": ("mean", "std", "n"), "slices_per_case_mean": ("mean",), "uncertainty": ("mean",),
          "qu_brats": ("mean",), "ensemble_curve": ("mean",)}


@dataclass(frozen=True)
class Metric:
    """One per-case value of the evaluation (a number, or the case's id, status or prediction file).

    name: its CSV column and JSON key. value: its value for one `CaseScores`; None where the case lacks the
    part it comes from, which is then written as `missing` (NaN: empty in the CSV, null in the JSON, "–" in
    Markdown; "" for counts). unit: "mm" for distances: two decimals in Markdown (else three), and listed
    after the unitless scores of its group in the summary. group: the `GROUPS` part its mean goes into (None:
    per case only), under `key` (default: its name). column: the header of its column in the Markdown per-case
    table (None: not shown there); cell: that column's text, ``{}`` this value, ``{other_name}`` another
    metric's of the same case. mean_column / mean_cell: the same in the Markdown table of its group's means
    (``{mean}``, ``{std}``, ``{n}``), drawn for the per-volume scores.
    """

    name: str
    value: Callable[[Any], Any]
    missing: Any = math.nan
    unit: str = ""
    group: str | None = None
    key: str | None = None
    column: str | None = None
    cell: str = "{}"
    mean_column: str | None = None
    mean_cell: str = "{mean} ± {std}"

    def of(self, case: Any) -> Any:
        v = self.value(case)
        return self.missing if v is None else v

    @property
    def digits(self) -> int:
        return 2 if self.unit == "mm" else 3


def _case(attr: str) -> Callable[[Any], Any]:
    return lambda c: getattr(c, attr)


def _slices(key: str) -> Callable[[Any], Any]:
    return lambda c: None if c.slices is None else c.slices.summary()[key]


def _curve(attr: str) -> Callable[[Any], Any]:
    return lambda c: None if c.curve is None else getattr(c.curve, attr)


def _uncertainty(key: str) -> Callable[[Any], Any]:
    return lambda c: None if c.uncertainty is None else c.uncertainty.row()[key]


def _calibration(key: str) -> Callable[[Any], Any]:
    return lambda c: None if c.calibration is None else c.calibration.row()[key]


def _qubrats(attr: str) -> Callable[[Any], Any]:
    return lambda c: None if c.qubrats is None else getattr(c.qubrats, attr)


_SLICES, _UNC = "slices_per_case_mean", "uncertainty"

METRICS: tuple[Metric, ...] = (
    Metric("case_id", _case("case_id"), column="case"),
    Metric("status", _case("status"), column="status"),
    Metric("dice", _case("dice"), group="volume_3d", column="Dice 3D", mean_column="Dice"),
    Metric("hd95_mm", _case("hd95_mm"), unit="mm", group="volume_3d", column="HD95 mm",
           mean_column="HD95 (mm, medpy)"),
    Metric("jaccard", _case("jaccard"), group="volume_3d", column="Jaccard 3D", mean_column="Jaccard"),
    Metric("hd95_directed_max_mm", _case("hd95_directed_max_mm"), unit="mm", group="volume_3d",
           mean_column="HD95 (mm, MONAI directed max)", mean_cell="{mean}"),
    Metric("gt_voxels", _case("gt_voxels")),
    Metric("pred_voxels", _case("pred_voxels")),
    Metric("slice_dice_mean", _slices("slice_dice_mean"), group=_SLICES, column="slice Dice [non-empty]",
           cell="{} [{slice_dice_mean_nonempty}]"),
    Metric("slice_dice_mean_nonempty", _slices("slice_dice_mean_nonempty"), group=_SLICES),
    Metric("slice_jaccard_mean", _slices("slice_jaccard_mean"), group=_SLICES),
    Metric("slice_jaccard_mean_nonempty", _slices("slice_jaccard_mean_nonempty"), group=_SLICES),
    Metric("slice_hd95_mean", _slices("slice_hd95_mean"), unit="mm", group=_SLICES),
    Metric("slice_hd95_mean_nonempty", _slices("slice_hd95_mean_nonempty"), unit="mm", group=_SLICES,
           column="slice HD95"),
    Metric("n_empty_pred", _slices("n_empty_pred"), missing="", column="empty / slices", cell="{} / {n_test_slices}"),
    Metric("n_test_slices", _slices("n_test_slices"), missing=""),
    Metric("single_run_dice", _curve("single_run_dice"), group="ensemble_curve", key="single_run_dice_mean"),
    Metric("single_run_slice_dice_mean", _curve("single_run_slice_dice_mean"), group="ensemble_curve"),
    Metric("n_members", _curve("n_members"), missing=""),
    *(Metric(k, _uncertainty(k), group=_UNC) for k in (
        "unc_top_percent", "unc_top_fraction", "unc_error_fraction_in_top", "unc_enrichment", "unc_variance_threshold",
        "unc_high_variance_error_dice", "unc_n_error", "var_filtered_dice_auc")),
    Metric("variance_auroc", _calibration("variance_auroc"), group=_UNC, column="variance AUROC"),
    Metric("entropy_auroc", _calibration("entropy_auroc"), group=_UNC),
    Metric("ece", _calibration("ece"), group=_UNC, column="ECE"),
    *(Metric(f"qu_brats_{attr}", _qubrats(attr), group="qu_brats") for attr in ("dice_auc", "ftp_auc", "ftn_auc",
                                                                                 "score")),
    Metric("prediction", _case("prediction")),
)


def row(case: Any) -> dict[str, Any]:
    """One case's value of every metric, in the order of `METRICS`."""
    return {m.name: m.of(case) for m in METRICS}


def in_group(group: str) -> list[Metric]:
    """The metrics averaged into `group`: unitless scores first, then distances (mm), each in table order."""
    return sorted((m for m in METRICS if m.group == group), key=lambda m: m.unit == "mm")


def mean_std(values: Sequence[Any]) -> tuple[float, float, int]:
    """(mean, sample sd, count) of the finite numbers among `values` (NaN, NaN, 0 without any; sd 0 for one)."""
    v = np.asarray([x for x in values if isinstance(x, numbers.Real) and math.isfinite(x)], np.float64)
    if not v.size:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def group_means(cases: Sequence[Any], group: str) -> dict[str, Any]:
    """The summary part `group` of the metrics in it, over `cases` (the scored ones)."""
    stats = GROUPS[group]
    out: dict[str, Any] = {}
    for m in in_group(group):
        mean, std, n = mean_std([m.of(c) for c in cases])
        values, key = {"mean": mean, "std": std, "n": n}, m.key or m.name
        out.update({key: mean} if stats == ("mean",) else {f"{key}_{s}": values[s] for s in stats})
    return out
