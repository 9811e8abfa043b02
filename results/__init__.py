"""Results of a sweep: the Parquet store (source of truth), MLflow tracking and the analyses.

Modules: schema (table schemas), store (`SweepStore`), tracking (`MlflowRecorder`,
`sync_mlflow`), stats, report (`build_report`), best (`best_runs`), status (`sweep_status`).
Import from the modules; this package imports nothing heavy on its own.
"""
