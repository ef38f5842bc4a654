"""Scoring segmentations against ground truth: the machinery of the `evaluate` command, one module a noun.

Lowest first; each module imports only those before it in this list, the runtime's ground floor (`metrics`,
`qubrats`, `outputs`, `errors`, `atomic`, `progress`) and the geometry/IO modules (`preprocess`, `nifti_io`,
`cases`):

* `columns`: the per-case metrics, one declarative table (`METRICS`) that the CSV, the JSON and the Markdown
  reports are all driven from: adding a per-case metric is one entry there;
* `uncertainty`: uncertainty-vs-error scores of one case (`uncertainty_scores`, `UncertaintyScores`);
* `protocol`: the scoring protocol: per-slice scores (paper Table 1), per-volume scores, ensemble-size curves
  (paper Figure 4) and one case's scores (`score_case`, `CaseScores`);
* `predictions`: a folder of predictions matched to labelled cases, loaded and scored (`find_prediction`,
  `score_folder`);
* `reports`: the summary and the files written from it (`summarize`, `write_reports`, `REPORT_NAMES`).

The segment-then-score loop, `evaluate.evaluate_folder`, sits above them, beside `cohort` (which it runs the
cases through). Nothing here imports `segment`, `sampler`, `cohort`, the CLI, or torch.
"""
from ..core.errors import BackendError

try:  # every module here scores through `metrics`, which needs scipy: say so once, as a DiffsegError
    from . import metrics as _metrics  # noqa: F401
except ImportError as _exc:
    raise BackendError(f"evaluation needs scipy, which cannot be imported ({_exc})", fix="pip install scipy") from None
