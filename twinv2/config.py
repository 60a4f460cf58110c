"""Loading params.yaml, the one source of hyper-parameters."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"


def default_params_path() -> Path:
    """params.yaml of the working directory (what `dvc repro` / `dvc exp run --temp` / `-S` edit: stages run
    in the workspace they were started in), else the repository's when the working directory has none."""
    here = Path.cwd() / "params.yaml"
    return here if here.is_file() else DEFAULT_PARAMS


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read params.yaml (default: default_params_path(), the working directory's) and apply dotted
    overrides {"train.lr": 0.01}."""
    p = Path(path) if path else default_params_path()
    try:
        with open(p) as f:
            params = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"params file {p} not found: expected a YAML file with sections "
                                "generate, validate, cluster, model, train, evaluate") from None
    params = copy.deepcopy(params)
    for key, value in (overrides or {}).items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return params
