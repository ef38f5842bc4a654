"""What a command does, over the layers below: the run's settings (`options`), which model runs (`models`), the
ensemble core (`core`), one case (`segment`), cohorts (`cohort`, `cohort_run`, `cohort_ray`), `evaluate` and the
review page. Imports: every layer below; never the CLI or the API.
"""
