"""The plan of a benchmark: its settings, its cells (model, variant, seed), their keys and cluster versions.

    settings(params)        the checked `benchmark` section of params
    plan(params, ...)       which cells (variants other than the default apply to benchmark.ablation_models)
    select(cells, names)    the cells named MODEL/VARIANT/SEED
    cell_key(model, params) what a cell computes (its model and result-relevant params): its identity
    prepare(data, ...)      build/find the cluster version of every variant; cells with their effective params
    shown_command(argv)     the command line as a report prints it (repository-relative paths)
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from twinv2.config import REPO_ROOT
from twinv2.errors import ConfigError
from twinv2.io import read_json

from pipelines.settings import MODELS, check_overrides

DEFAULT_VARIANT = "default"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# params sections that decide what a cell computes (its key); the others (airflow, register, benchmark, ...)
# do not change a cell's result
KEY_SECTIONS = ("model", "train", "gbdt", "evaluate", "cluster")

# keys that change how fast, never what: left out of the key
EXECUTION_ONLY = {"train": {"progress", "num_workers", "log_every", "keep_checkpoints"},
                  "evaluate": {"plots"}, "cluster": {"n_jobs", "chunk_rows", "finalize_last_shard", "n_shards"}}

# ablation switches added after cells existed: at their default (today's behaviour) left out of the key, so
# a cell computed before the switch stays done (pipelines.cluster.NAME_DEFAULTS does the same for versions)
KEY_DEFAULTS = {"model": {"log_n": True, "numeric_embed": 0, "numeric_dim": 8, "numeric_sigma": 1.0,
                          "cluster_order": "time", "match_recency": False},
                "cluster": {"virtual_ids": "nearest", "method": "hierarchical"}}

# switches added later that only some models read: left out of the key of every other model (their cells stay done)
KEY_ONLY_FOR = {"model": {"cluster_order": {"twinv2"}}}


def settings(params: dict) -> dict:
    """The checked `benchmark` section of params."""
    bm = params.get("benchmark")
    if not isinstance(bm, dict):
        raise ConfigError("params.yaml has no `benchmark:` section (variants, models, seeds); expected the "
                          "repository's params.yaml or a copy of it")
    variants = bm.get("variants") or {}
    if not isinstance(variants, dict):
        raise ConfigError(f"benchmark.variants: expected a mapping name -> {{section.key: value}}, got "
                          f"{type(variants).__name__}")
    default = str(bm.get("default_variant", DEFAULT_VARIANT))
    out = {}
    for name, ov in variants.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ConfigError(f"benchmark.variants: {name!r} is not a valid variant name (letters, digits, "
                              f"'_', '.', '-')")
        if ov is None:
            ov = {}
        if not isinstance(ov, dict):
            raise ConfigError(f"benchmark.variants.{name}: expected a mapping of dotted params keys to values "
                              f"(e.g. {{cluster.gamma: 5}}), got {ov!r}")
        for k in ov:
            if not isinstance(k, str) or "." not in k or any(not p for p in k.split(".")):
                raise ConfigError(f"benchmark.variants.{name}: {k!r} is not a dotted params key (e.g. model.topk)")
            if k.split(".")[0] in ("benchmark", "airflow"):
                raise ConfigError(f"benchmark.variants.{name}: {k!r} cannot be overridden by a variant")
        out[name] = check_overrides({k: v for k, v in params.items() if k != "benchmark"}, dict(ov),
                                    f"params.yaml (benchmark.variants.{name})")
    if default not in out:
        raise ConfigError(f"benchmark.variants: no {default!r} variant (no overrides: the reference of the "
                          f"ablations); add `{default}: {{}}`")
    if out[default]:
        raise ConfigError(f"benchmark.variants.{default}: the default variant must have no overrides, has "
                          f"{out[default]}")
    seeds = bm.get("seeds", 3)
    return {"variants": out, "default": default, "models": list(bm.get("models") or ["twinv2", "twin"]),
            "seeds": seeds, "reference": str(bm.get("reference", "twin")),
            "ablation_models": list(bm.get("ablation_models") or ["twinv2"]),
            "run_variants": bm.get("run_variants")}


def _names(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    out = [str(x).strip() for x in items if str(x).strip()]
    return out or None


def _seeds(value: Any) -> list[int]:
    if isinstance(value, bool):
        raise ConfigError(f"--seeds {value!r}: expected a count N >= 1 (seeds 0..N-1) or a list of seeds")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"--seeds {value}: expected a count N >= 1 (seeds 0..N-1)")
        return list(range(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(s, int) and not isinstance(s, bool)
                                                          for s in value):
        return sorted(set(value))
    raise ConfigError(f"benchmark.seeds {value!r}: expected a count N >= 1 (seeds 0..N-1) or a list of ints")


def _section_key(params: dict, model: str | None = None) -> dict:
    out = {}
    for s in KEY_SECTIONS:
        sec = params.get(s)
        if isinstance(sec, dict):
            dflt, only = KEY_DEFAULTS.get(s, {}), KEY_ONLY_FOR.get(s, {})
            out[s] = {k: v for k, v in sec.items() if k not in EXECUTION_ONLY.get(s, set())
                      and not (k in dflt and v == dflt[k]) and not (k in only and model not in only[k])}
    return out


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def cell_key(model: str, params: dict) -> str:
    """What a cell computes: its model and the result-relevant params (incl. the pinned cluster version)."""
    return digest({"model": model, "params": _section_key(params, model)})


def plan(params: dict, models=None, seeds=None, variants=None) -> list[dict]:
    """The cells (model, variant, seed, overrides), without cluster versions. The default variant always runs
    (every model); the other variants run for benchmark.ablation_models."""
    st = settings(params)
    models = _names(models) or st["models"]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise ConfigError(f"--models {','.join(models)}: {bad} are not models; expected some of {', '.join(MODELS)}")
    seed_list = _seeds(seeds if seeds is not None else st["seeds"])
    names = _names(variants) or _names(st["run_variants"]) or list(st["variants"])
    unknown = [v for v in names if v not in st["variants"]]
    if unknown:
        raise ConfigError(f"--variants {','.join(names)}: {unknown} are not variants of params.yaml "
                          f"benchmark.variants; expected some of {', '.join(st['variants'])}")
    names = [st["default"]] + [v for v in dict.fromkeys(names) if v != st["default"]]
    cells = []
    for v in names:
        for m in dict.fromkeys(models):
            if v != st["default"] and m not in st["ablation_models"]:
                continue
            for s in seed_list:
                cells.append({"model": m, "variant": v, "seed": int(s), "overrides": dict(st["variants"][v])})
    return cells


def select(cells: list[dict], only: Iterable[str]) -> list[dict]:
    """The cells named MODEL/VARIANT/SEED (seed with or without the 'seed' prefix), in plan order; a name
    that is not a cell of the plan is a ConfigError."""
    want = {}
    for name in only:
        parts = str(name).strip().split("/")
        if len(parts) != 3 or not parts[2].removeprefix("seed").isdigit():
            raise ConfigError(f"--cell {name!r}: expected MODEL/VARIANT/SEED, e.g. twinv2/gamma5/0")
        want[(parts[0], parts[1], int(parts[2].removeprefix("seed")))] = name
    have = {(c["model"], c["variant"], c["seed"]) for c in cells}
    missing = [n for k, n in want.items() if k not in have]
    if missing:
        raise ConfigError(f"--cell {', '.join(missing)}: not a cell of the plan (models x variants x seeds; the "
                          f"variants other than the default run for benchmark.ablation_models only)")
    return [c for c in cells if (c["model"], c["variant"], c["seed"]) in want]


def label(cell: dict) -> str:
    return f"{cell['model']}/{cell['variant']}/seed{cell['seed']}"


def cell_dir(out: str | Path, cell: dict) -> Path:
    return Path(out) / "cells" / cell["model"] / cell["variant"] / f"seed{cell['seed']}"


def effective_params(params: dict, cell: dict) -> dict:
    p = load_params_from(params, {**cell["overrides"], "train.seed": int(cell["seed"])})
    if cell.get("cluster_version"):
        p.setdefault("train", {})["cluster_version"] = cell["cluster_version"]
    return p


def load_params_from(base: dict, overrides: dict) -> dict:
    """`base` with dotted overrides applied (twinv2.config.load_params' rule, on a dict)."""
    p = copy.deepcopy(base)
    for key, value in overrides.items():
        node = p
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = copy.deepcopy(value)
    return p


def _cluster_ident(params: dict) -> str:
    c = params.get("cluster", {})
    return digest({k: v for k, v in c.items() if k not in EXECUTION_ONLY["cluster"]})


def prepare(data: str | Path, params: dict, cells: list[dict]) -> list[dict]:
    """Build (or find: cluster versions are content-addressed, so an existing one is reused) the cluster
    version of every distinct `cluster` section among the cells' params, pin it in each cell
    (cluster_version), and give each cell its effective params and key. DIR/clusters/CURRENT is left as it
    was (the default variant's version when there was none)."""
    from pipelines import cluster
    from twinv2.clustering import store

    data = Path(data)
    before = store.current_version(data)
    versions: dict[str, dict] = {}
    out = []
    default_version = None
    try:
        for cell in cells:
            p = load_params_from(params, cell["overrides"])
            ident = _cluster_ident(p)
            if ident not in versions:
                emb = p.get("cluster", {}).get("embeddings")
                t0 = time.perf_counter()
                rep = cluster.run(data=data, params=p, embeddings=emb)
                versions[ident] = {"version": rep["version"], "s": time.perf_counter() - t0}
            v = versions[ident]["version"]
            if not cell["overrides"]:
                default_version = v
            c = {**cell, "cluster_version": v}
            c["params"] = effective_params(params, c)
            c["key"] = cell_key(c["model"], c["params"])
            c["label"] = label(c)
            out.append(c)
    finally:
        restore = before or default_version
        if restore and store.is_complete(store.version_dir(data, restore)):
            store.switch_current(data, restore)
    return out


def cluster_summary(data: str | Path, version: str) -> dict:
    """Size and cost of one cluster version (its report.json): behaviours, clusters, compression ratio,
    clustering seconds per 10^6 behaviours (as measured when it was built)."""
    from twinv2.clustering import store

    p = store.version_dir(data, version) / "report.json"
    rep = read_json(p) if p.exists() else {}
    nb = rep.get("n_behaviours") or rep.get("n_behaviors")
    nc = rep.get("n_clusters")
    timings = rep.get("timings") or {}
    secs = timings.get("total_s") or timings.get("cluster_s")
    return {"version": version, "n_behaviours": nb, "n_clusters": nc,
            "compression": (nb / nc) if nb and nc else None,
            "cluster_s": secs, "s_per_1e6_behaviours": (secs / nb * 1e6) if secs and nb else None}


def clusters_of(data, cells: list[dict]) -> list[dict]:
    by: dict[str, list[str]] = {}
    for c in cells:
        if c.get("cluster_version"):
            by.setdefault(c["cluster_version"], [])
            if c["variant"] not in by[c["cluster_version"]]:
                by[c["cluster_version"]].append(c["variant"])
    return [{**cluster_summary(data, v), "variants": vs} for v, vs in by.items()]


def shown_command(argv: list[str]) -> str:
    """The command line as a report prints it: absolute paths inside this repository become repository-relative
    (`--publish /home/me/twinv2/docs/results.md` -> `--publish docs/results.md`), so a published report names
    the files a reader has; every other argument is kept as given."""
    out = []
    for tok in argv:
        if tok.startswith("--") and "=" in tok:
            k, v = tok.split("=", 1)
            out.append(f"{k}={shown_path(v)}")
        else:
            out.append(shown_path(tok))
    return " ".join(out)


def shown_path(tok: str) -> str:
    """An absolute path inside this repository as a repository-relative one; anything else as given."""
    if not os.path.isabs(tok):
        return tok
    try:
        return Path(tok).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return tok
