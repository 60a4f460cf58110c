"""Loading params.yaml, the one source of hyper-parameters."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read params.yaml (default: the repository's) and apply dotted overrides {"train.lr": 0.01}."""
    p = Path(path) if path else DEFAULT_PARAMS
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
