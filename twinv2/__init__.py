"""twinv2: TWIN-V2 life-cycle behaviour modelling (library layer: pure, no Airflow/MLflow/DVC)."""

__version__ = "0.1.0"
