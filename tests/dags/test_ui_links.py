"""What a new user is told to open (issue 32, items 10 and 13): the MLflow link opens the experiment on its runs
in a fresh browser, `make serve` serves the champion with the virtualenv's mlflow on 127.0.0.1, and README and
the `make airflow` banner name every DAG. Fast: no server started."""
from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
from pathlib import Path

from pipelines import services

REPO = Path(__file__).resolve().parents[2]


def _ui_bundle() -> str:
    root = Path(importlib.util.find_spec("mlflow").submodule_search_locations[0])
    return "".join(p.read_text(errors="replace") for p in (root / "server/js/build/static/js").glob("main.*.js"))


def test_mlflow_link_opens_the_runs_not_the_genai_overview():
    """MLflow 3.17's UI takes an experiment page's kind from the URL's workflowType, else from the browser's
    stored choice, which starts as GenAI (the experiment's mlflow.experimentKind tag is no longer read). The
    link we print carries workflowType=machine_learning."""
    js = _ui_bundle()
    assert 'e.get("workflowType")' in js and 'key:"mlflow.workflowType"' in js, "the UI's workflow switch moved"
    assert re.search(r'GENAI="genai",\w+\.MACHINE_LEARNING="machine_learning"', js)
    assert re.search(r'const \w+=\w+\.GENAI,\w+=\(0,\w+\.createContext\)\(\{workflowType:\w+', js), \
        "a fresh browser no longer starts on GenAI: the link may not need the parameter"
    url = services.mlflow_experiment_url("http://127.0.0.1:5000/", "7")
    assert url == "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"
    assert services.mlflow_experiment_url("http://h:1", None).endswith("#/experiments?workflowType=machine_learning")
    main_job = (REPO / "pipelines" / "main_job.py").read_text()
    assert "mlflow_experiment_url(" in main_job and "mlflow_experiment_url(" in inspect.getsource(services._serve)


def test_make_serve_uses_the_venvs_mlflow_on_loopback():
    out = subprocess.run(["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    line = out.strip().replace("\\\n", " ")
    assert f'PATH="{REPO / ".venv" / "bin"}:$PATH"' in line, line            # its uvicorn found
    assert ".venv/bin/mlflow models serve -m models:/twinv2@champion --env-manager local" in line, line
    assert "--host 127.0.0.1" in line and "0.0.0.0" not in line, line
    assert "make serve" in (REPO / "README.md").read_text()


def test_readme_and_banner_name_every_dag():
    dags = set(re.findall(r'dag_id="(\w+)"', "".join(p.read_text() for p in (REPO / "dags").glob("*.py"))))
    assert {"twinv2_daily", "twinv2_recluster", "twinv2_benchmark"} <= dags
    banner = inspect.getsource(services._serve)
    readme = (REPO / "README.md").read_text()
    for d in dags:
        assert d in banner, (d, "missing from the make airflow banner")
        assert d in readme, (d, "missing from README")
