"""Results of a sweep: the Parquet store (source of truth), MLflow tracking and the analyses.

Modules: schema (the columns, declared once), store (`SweepStore`), sink (`ResultSink`: each
finished stage to Parquet, then MLflow), mlflow_uri (which tracking store), mlflow_rows (a row
as MLflow params, metrics and tags), tracking (`MlflowRecorder`, `sync_mlflow`), stats,
confirmatory (the claims' confirmatory tests), sequential (their group-sequential form) and
adaptive (`nptm sweep --until-conclusive`'s looks), analysis, power (`nptm plan --power`),
figures, report (`build_report`), tables (the table renderer), best (`best_runs`), status
(`sweep_status`), run_record (the run record's files). Import from the modules; this package
imports nothing heavy on its own.
"""
