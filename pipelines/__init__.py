"""Pipeline stages: one module per stage. The same functions serve the CLI, DVC stages and Airflow tasks."""
