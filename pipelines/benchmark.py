"""`twinv2 benchmark --data DIR --out OUT [--models ...] [--seeds N] [--variants ...]`: the experiment matrix.

A cell is (model, variant, seed). Its params are params.yaml + the variant's overrides (params.yaml
`benchmark.variants`, dotted keys) + train.seed = seed + train.cluster_version = the cluster version built
with the variant's `cluster` section (content-addressed by pipelines.cluster: two variants with different
clustering params get different versions; the same params the same one). Every cell calls the stage
functions themselves (pipelines.train.run, pipelines.evaluate.run) into OUT/cells/<model>/<variant>/seed<S>/run.

    plan(...)          which cells (variants other than the default apply to benchmark.ablation_models)
    prepare(...)       build/find the cluster version of every variant; cells with their effective params
    run_cell(...)      one cell, resumable and idempotent (below)
    report(...)        OUT/results.json, OUT/results.md (tables 1-5), OUT/plots/*.png
    run(...)           all of it (the CLI); one MLflow parent run with a nested run per cell when tracking is on

Resumable and idempotent: a cell is done when OUT/.../cell.json (written atomically, last) holds the key of
its effective params (sha256 of model, params sections and cluster version); a done cell is never
recomputed. A cell without it (crashed or killed) is re-run: training continues from its newest epoch
checkpoint (`resume=True`) when one exists, a finished training (model.pt + train_metrics.json) is not
redone, only evaluate; a cell whose params changed (another key) starts afresh.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from twinv2.config import REPO_ROOT, load_params
from twinv2.errors import ConfigError
from twinv2.io import atomic_dir, atomic_path, read_json, write_json

DEFAULT_VARIANT = "default"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# params sections that decide what a cell computes (its key); the others (airflow, register, benchmark, ...)
# do not change a cell's result
KEY_SECTIONS = ("model", "train", "gbdt", "evaluate", "cluster")
# keys that change how fast, never what: left out of the key
EXECUTION_ONLY = {"train": {"progress", "num_workers", "log_every", "keep_checkpoints"},
                  "evaluate": {"plots"}, "cluster": {"n_jobs", "chunk_rows", "finalize_last_shard", "n_shards"}}
METRIC_KEYS = ("auc", "gauc", "logloss", "oracle_auc", "oracle_gap", "ece")
# ablation switches added after cells existed: at their default (today's behaviour) left out of the key, so
# a cell computed before the switch stays done (pipelines.cluster.NAME_DEFAULTS does the same for versions)
KEY_DEFAULTS = {"model": {"log_n": True, "numeric_embed": 0, "numeric_dim": 8, "numeric_sigma": 1.0,
                          "cluster_order": "time", "match_recency": False},
                "cluster": {"virtual_ids": "nearest", "method": "hierarchical"}}
# switches added later that only some models read: left out of the key of every other model (their cells stay done)
KEY_ONLY_FOR = {"model": {"cluster_order": {"twinv2"}}}


# ------------------------------------------------------------------------------------------ settings
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
        from pipelines.cli import check_overrides

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
    from pipelines.cli import MODELS

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


# ------------------------------------------------------------------------------------------ clusters
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


# ------------------------------------------------------------------------------------------ one cell
class _PeakRSS:
    """Peak resident memory of this process (and its children) while a cell runs, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        try:
            import psutil

            proc = psutil.Process()
            rss = proc.memory_info().rss
            for ch in proc.children(recursive=True):
                try:
                    rss += ch.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, rss)
        except Exception:  # noqa: BLE001 - a measurement, never a failure of the cell
            pass

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self):
        self._sample()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=2)
        self._sample()

    @property
    def mb(self) -> float | None:
        return self.peak / 2**20 if self.peak else None


def is_done(out: str | Path, cell: dict) -> bool:
    p = cell_dir(out, cell) / "cell.json"
    if not p.exists():
        return False
    try:
        return read_json(p).get("key") == cell["key"]
    except (OSError, ValueError):
        return False


RECORD_KEYS = ("model", "variant", "seed", "key", "label", "overrides", "cluster_version", "cluster_params", "metrics",
               "cost", "train", "curve", "how", "run_dir")


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


def adopt(out: str | Path, cells: list[dict], results: str | Path) -> dict:
    """Take the finished cells of an earlier report (its results.json) as done: a planned cell that is not done
    in OUT and whose key equals the key of a cell there gets that record as its OUT/.../cell.json (how: "adopted
    from ..."). The key covers the model, every result-relevant params section and the cluster version, which is
    content-addressed over the validated data, the embedding and the clustering params: a cell computed on other
    data or with other params has another key and is computed here instead. What the key does not cover is the
    code: adopt only a report made at a commit whose training and evaluation code equals this one (its commit is
    recorded in the records and in the new report). Returns {"from", "commit", "cells": [labels adopted]}."""
    results = Path(results)
    try:
        old = read_json(results)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--adopt {results}: cannot read it as a benchmark results.json ({e})") from e
    recs = old.get("cells") if isinstance(old, dict) else None
    if not isinstance(recs, list):
        raise ConfigError(f"--adopt {results}: no `cells` list; expected the results.json of `twinv2 benchmark`")
    commit = (old.get("meta") or {}).get("git_commit")
    src = shown_path(str(results))
    by_key: dict[str, dict] = {}
    for i, r in enumerate(recs):
        missing = [k for k in ("model", "variant", "seed", "key", "metrics") if not isinstance(r, dict) or k not in r]
        if missing:
            raise ConfigError(f"--adopt {results}: cells[{i}] lacks {missing}; expected a benchmark cell record")
        by_key[str(r["key"])] = r
    taken = []
    for c in cells:
        r = by_key.get(c["key"])
        if r is None or is_done(out, c):
            continue
        if (r["model"], r["variant"], int(r["seed"])) != (c["model"], c["variant"], int(c["seed"])):
            continue            # the same params under another name: computed here, so that labels stay true
        rec = {k: r.get(k) for k in RECORD_KEYS}
        # provenance: the commit that COMPUTED the cell (a cell adopted there keeps its own origin, so a chain of
        # re-published reports still names where each figure was computed)
        first = r.get("adopted") if isinstance(r.get("adopted"), dict) else None
        computed = first.get("commit") if first else commit
        rec.update(label=label(c), how=f"adopted from {src} (computed at commit {computed})",
                   adopted={"from": src, "commit": computed, **({"via": first.get("from")} if first else {})},
                   finished_s=time.time())
        d = cell_dir(out, c)
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "cell.json", rec)
        taken.append(label(c))
    return {"from": src, "commit": commit, "cells": taken}


def _compute(data: str | Path, out: str | Path, cell: dict) -> dict:
    from pipelines import evaluate, train

    d = cell_dir(out, cell)
    run = d / "run"
    started = d / "started.json"
    if started.exists():
        try:
            old = read_json(started).get("key")
        except (OSError, ValueError):
            old = None
        if old != cell["key"] and run.exists():        # other params: nothing there can be reused
            shutil.rmtree(run)
    elif run.exists():
        shutil.rmtree(run)
    d.mkdir(parents=True, exist_ok=True)
    write_json(started, {"key": cell["key"], "label": label(cell), "started_s": time.time()})
    params = cell["params"]
    bound = os.environ.get("MLFLOW_RUN_ID")
    how = "fresh"
    with _PeakRSS() as rss:
        if (run / "model.pt").exists() and (run / "train_metrics.json").exists():
            trained = read_json(run / "train_metrics.json")
            how = "train reused (evaluate re-run)"
            train_s = float(trained.get("total_wall_s") or trained.get("wall_s") or 0.0)
        else:
            resume = cell["model"] != "gbdt" and any((run / "checkpoints").glob("epoch-*.pt"))
            how = "resumed from checkpoint" if resume else "fresh"
            t0 = time.perf_counter()
            trained = train.run(data=data, model=cell["model"], out=run, params=params, resume=resume)
            train_s = time.perf_counter() - t0
        if bound:            # mlflow's end_run (train's) unsets MLFLOW_RUN_ID: evaluate logs into the same run
            os.environ["MLFLOW_RUN_ID"] = bound
        t0 = time.perf_counter()
        metrics = evaluate.run(data=data, run=run, params=params)
        eval_s = time.perf_counter() - t0
    n_train = trained.get("n_train")
    sps = trained.get("samples_per_s")
    if sps is None and n_train and train_s:          # gbdt: one pass over the training samples
        epochs = 1 if cell["model"] == "gbdt" else trained.get("epochs_run")
        sps = n_train * epochs / train_s if epochs else None
    record = {
        "model": cell["model"], "variant": cell["variant"], "seed": int(cell["seed"]), "key": cell["key"],
        "label": label(cell), "overrides": cell["overrides"], "cluster_version": cell.get("cluster_version"),
        "metrics": {**{k: metrics.get(k) for k in METRIC_KEYS}, "by_group": metrics.get("by_group"),
                    "diversity": metrics.get("diversity"), "n_test": metrics.get("n_test")},
        "train": {k: trained.get(k) for k in ("best_epoch", "epochs_run", "best_valid_gauc", "resumed_from_epoch",
                                              "n_train")},
        "cost": {"train_s": train_s, "samples_per_s": sps, "evaluate_s": eval_s, "peak_rss_mb": rss.mb,
                 "gsu_positions": gsu_positions(run), "macs_per_candidate": model_macs(run)},
        "curve": [{k: h.get(k) for k in ("epoch", "train_loss", "valid_auc", "valid_gauc")}
                  for h in trained.get("history") or [] if isinstance(h, dict)],
        "cluster_params": {k: params.get("cluster", {}).get(k) for k in ("gamma", "exponent", "group_edges")},
        "how": how, "run_dir": str(run), "finished_s": time.time(),
    }
    write_json(d / "cell.json", record)                  # atomic, last: the done marker
    return record


def gsu_positions(run: Path) -> int | None:
    """Positions of the long sequence the GSU scores per candidate (at most): model.long_len of the run's
    config (raw behaviours, or clusters for TWIN-V2); None for a model without a long part."""
    try:
        cfg = read_json(run / "config.json")
    except (OSError, ValueError):
        return None
    if cfg.get("long_source") in (None, "none"):
        return None
    return cfg.get("long_len")


def _linear_macs(mod) -> int:
    """Multiply-adds of one row through every nn.Linear inside `mod` (in_features * out_features each)."""
    import torch.nn as nn

    return sum(m.in_features * m.out_features for m in mod.modules() if isinstance(m, nn.Linear))


def _attention_macs(att, n_gsu: int, n_esu: int) -> int:
    """One TwinAttention for one candidate: a GSU scoring n_gsu positions (keys only) and/or an ESU attending
    n_esu positions (keys, values, softmax pooling), each stage with its own query projection; per position
    from the module's shapes: key projection d_h x H*dk, cross scalars J x c, cross terms H x J, target-match
    terms H x F, the score dot H*dk; the ESU adds the value projection (d_h + J*c) x H*dk and the pooling H*dk."""
    hd = att.w_q.out_features
    per_key = (att.w_h.in_features * att.w_h.out_features + att.w_c.numel() + att.beta.numel() + hd
               + (att.beta_m.numel() if att.match_fields else 0))
    per_val = att.w_v.in_features * att.w_v.out_features + hd
    query = att.w_q.in_features * att.w_q.out_features
    stages = (n_gsu > 0) + (n_esu > 0)
    return stages * query + n_gsu * per_key + n_esu * (per_key + per_val)


def macs_per_candidate(model, params: dict | None = None) -> int | None:
    """Multiply-adds one candidate costs in one forward (the uncached serving path: no per-id projection
    cache, nothing shared across candidates), counted from the module shapes and the sequence lengths:
    GSU over the long sequence (long_len positions) + ESU over its top-k (k' = min(topk, long_len)) + the
    short attention (short_len positions) + the head MLP. Elementwise products (DIN's k * q, a * v) count as
    multiply-adds; embedding lookups, softmax, top-k and sums cost none. None for a model that is not a
    neural CTRModel (gbdt). `params` (the `model` section or the whole dict; optional): the params the model
    was built with, checked against it (topk, short_len) so a count is never of other lengths than given."""
    from twinv2.models.base import CTRModel, TwoStage
    from twinv2.models.din import DIN
    from twinv2.models.eta import ETA
    from twinv2.models.sdim import SDIM
    from twinv2.models.sim import SIMSoft
    from twinv2.models.twin import TWIN

    if not isinstance(model, CTRModel):
        return None
    mp = (params or {}).get("model", params or {})
    for key, have in (("topk", model.topk), ("short_len", model.short_len)):
        if key in mp and int(mp[key]) != have:
            raise ValueError(f"macs_per_candidate: the {model.name} model was built with {key} {have}, params "
                             f"model.{key} is {mp[key]!r}; pass the params the model was built with")
    k, S, L = model.topk, model.short_len, model.long_len
    kk = min(k, L)
    f = model.features
    d_kc = f.d_h + f.n_cross * f.cross_dim                                  # [K_h, K_c] width
    macs = _attention_macs(model.short, 0, S) + _linear_macs(model.head)
    if model.long_source == "none":
        return int(macs)
    if isinstance(model, TWIN):                                             # TWIN / TWIN-V2: one module, 2 stages
        macs += _attention_macs(model.long_attn, L, kk)
    elif isinstance(model, TwoStage):                                       # own GSU, then the ESU on k'
        macs += _attention_macs(model.long_attn, 0, kk)
        if isinstance(model, SIMSoft):                                      # e'_i . e'_q and the pooled side input
            macs += 2 * L * model.soft.embedding_dim
        elif isinstance(model, ETA):                                        # SimHash of the L behaviours + target
            macs += (L + 1) * model.planes.shape[0] * model.planes.shape[1]
    elif isinstance(model, SDIM):                                           # hashes, then bucket sums per hash
        macs += (L + 1) * model.planes.shape[0] * model.planes.shape[1] + L * model.m * d_kc
    elif isinstance(model, DIN):                                            # activation unit + values per position
        macs += L * (_linear_macs(model.activation) + f.d_h + _linear_macs(model.w_v) + model.w_v.out_features)
    # AvgPool: a masked mean, no multiply-add
    return int(macs)


def model_macs(run: Path) -> int | None:
    """macs_per_candidate of a trained run's model (None for gbdt or an unreadable run)."""
    try:
        cfg = read_json(run / "config.json")
        if cfg.get("model") == "gbdt":
            return None
        from twinv2.training.scoring import load_run_model

        model, _, _ = load_run_model(run)
        return macs_per_candidate(model)
    except Exception:  # noqa: BLE001 - a measurement, never a failure of the cell
        return None


def run_cell(data: str | Path, out: str | Path, cell: dict, track: tuple[dict, str] | None = None) -> dict:
    """One cell; returns its record (cell.json). A done cell (same key) is read back, not recomputed.
    track = (MLflow identity, parent run id): the cell computes inside a nested run of the parent (params of
    the cell on it; train and evaluate log into it)."""
    if is_done(out, cell):
        rec = read_json(cell_dir(out, cell) / "cell.json")
        return {**rec, "skipped": True}
    if track is None:
        return _compute(data, out, cell)
    from pipelines import tracking

    ctx, parent = track
    rep = tracking.run_stage(ctx, parent, "benchmark_cell", _compute, key=label(cell), data=data,
                             params=cell["params"], bind_run=True,
                             tags={"model": cell["model"], "variant": cell["variant"], "seed": cell["seed"],
                                   "cell_key": cell["key"], "cluster_version": cell.get("cluster_version"),
                                   "overrides": json.dumps(cell["overrides"], sort_keys=True)},
                             artifacts=[cell_dir(out, cell) / "cell.json", cell_dir(out, cell) / "run" / "plots"],
                             kwargs={"data": data, "out": out, "cell": cell})
    return rep


# ------------------------------------------------------------------------------------------ statistics
def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Paired differences a - b over the seeds both have: n, mean, sample std, and the 95% t-interval
    mean +- t(0.975, n - 1) * std / sqrt(n) (None when n < 2)."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    d = [float(a[s]) - float(b[s]) for s in seeds]
    m, sd = mean_std(d)
    out = {"n": len(d), "seeds": seeds, "diffs": d, "mean": m, "std": sd, "ci95": None}
    if len(d) >= 2 and sd is not None:
        from scipy.stats import t

        h = float(t.ppf(0.975, len(d) - 1)) * sd / math.sqrt(len(d))
        out["ci95"] = [m - h, m + h]
    return out


def _f(x, nd=4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ms(xs, nd=4) -> str:
    m, s = mean_std(xs)
    if m is None:
        return "n/a"
    return f"{m:.{nd}f}" if s is None else f"{m:.{nd}f} +- {s:.{nd}f}"


def _pd(p: dict, nd=4) -> str:
    if not p or not p["n"]:
        return "n/a"
    s = f"{p['mean']:+.{nd}f}"
    if p["std"] is not None:
        s += f" +- {p['std']:.{nd}f}"
    if p["ci95"] is not None:
        s += f" [{p['ci95'][0]:+.{nd}f}, {p['ci95'][1]:+.{nd}f}]"
    return s + f" (n={p['n']})"


# ------------------------------------------------------------------------------------------ report
def _by(records, model, variant, fn) -> dict[int, Any]:
    return {r["seed"]: fn(r) for r in records if r["model"] == model and r["variant"] == variant}


def _group(r, i, key):
    g = (r["metrics"].get("by_group") or [])
    return g[i].get(key) if i < len(g) and isinstance(g[i], dict) else None


def _div(r, part, key):
    d = (r["metrics"].get("diversity") or {}).get(part) or {}
    return d.get(key)


def tables(records: list[dict], st: dict, models: list[str], variants: list[str]) -> dict:
    """The five tables as lists of rows (dicts), computed from the cell records."""
    default, ref = st["default"], st["reference"]
    models = [m for m in models if any(r["model"] == m and r["variant"] == default for r in records)]
    t: dict[str, list] = {"main": [], "ablation": [], "groups": [], "group_gain": [], "diversity": [], "cost": []}
    for m in models:
        row = {"model": m, "n": len(_by(records, m, default, lambda r: 1))}
        for k in ("auc", "gauc", "logloss", "oracle_gap"):
            row[k] = mean_std(list(_by(records, m, default, lambda r, k=k: r["metrics"].get(k)).values()))
        for k in ("auc", "gauc"):
            row[f"d_{k}"] = (paired(_by(records, m, default, lambda r, k=k: r["metrics"].get(k)),
                                    _by(records, ref, default, lambda r, k=k: r["metrics"].get(k)))
                             if m != ref else None)
        t["main"].append(row)
    for m in st["ablation_models"]:
        for v in variants:
            if not any(r["model"] == m and r["variant"] == v for r in records):
                continue
            row = {"model": m, "variant": v, "overrides": st["variants"].get(v, {}),
                   "n": len(_by(records, m, v, lambda r: 1))}
            for k in ("auc", "gauc", "logloss", "oracle_gap"):
                row[k] = mean_std(list(_by(records, m, v, lambda r, k=k: r["metrics"].get(k)).values()))
            for k in ("auc", "gauc"):
                row[f"d_{k}"] = (paired(_by(records, m, v, lambda r, k=k: r["metrics"].get(k)),
                                        _by(records, m, default, lambda r, k=k: r["metrics"].get(k)))
                                 if v != default else None)
            t["ablation"].append(row)
    n_groups = max((len(r["metrics"].get("by_group") or []) for r in records), default=0)
    for m in models:
        for i in range(n_groups):
            recs = [r for r in records if r["model"] == m and r["variant"] == default]
            lo = [_group(r, i, "min_len") for r in recs]
            hi = [_group(r, i, "max_len") for r in recs]
            t["groups"].append({"model": m, "group": i, "lengths": (lo[0], hi[0]) if recs else (None, None),
                                "auc": mean_std(list(_by(records, m, default, lambda r: _group(r, i, "auc")).values())),
                                "gauc": mean_std(list(_by(records, m, default, lambda r: _group(r, i, "gauc")).values()))})
    if "twinv2" in models and ref in models and ref != "twinv2":
        for i in range(n_groups):
            t["group_gain"].append({"group": i, **{k: paired(_by(records, "twinv2", default, lambda r: _group(r, i, k)),
                                                         _by(records, ref, default, lambda r: _group(r, i, k)))
                                                   for k in ("auc", "gauc")}})
    for m in models:
        vals = {k: mean_std(list(_by(records, m, default, lambda r, k=k: _div(r, *k)).values()))
                for k in (("retrieval", "distinct_categories"), ("retrieval", "entropy"), ("ranking", "coverage"),
                          ("ranking", "ild"))}
        t["diversity"].append({"model": m, **{f"{a}.{b}": v for (a, b), v in vals.items()}})
        t["cost"].append({"model": m, **{k: mean_std(list(_by(records, m, default,
                                                              lambda r, k=k: _cost(r, k)).values()))
                                         for k in ("train_s", "samples_per_s", "evaluate_s", "peak_rss_mb",
                                                   "gsu_positions", "macs_per_candidate")},
                          "epochs_run": mean_std(list(_by(records, m, default,
                                                          lambda r: r["train"].get("epochs_run")).values()))})
    return t


def _cost(r: dict, k: str):
    """A cost of a cell record; macs_per_candidate of a cell done before it was recorded: from its run."""
    if k == "macs_per_candidate" and k not in r["cost"] and r.get("run_dir") and r.get("model") != "gbdt":
        r["cost"][k] = model_macs(Path(r["run_dir"]))
    return r["cost"].get(k)


def _m(pair, nd=4) -> str:
    m, s = pair
    if m is None:
        return "n/a"
    return f"{m:.{nd}f}" if s is None else f"{m:.{nd}f} +- {s:.{nd}f}"


def markdown(t: dict, st: dict, meta: dict, clusters: list[dict]) -> str:
    ref, default = st["reference"], st["default"]
    L = ["# Benchmark results", "",
         f"Generated by `{meta['command']}` at git commit `{meta['git_commit']}` on {meta['date']} "
         f"(data `{meta['data']}`, {meta['n_cells']} cells: models {', '.join(meta['models'])}; variants "
         f"{', '.join(meta['variants'])}; seeds {', '.join(map(str, meta['seeds']))}). Mean +- sample std over "
         f"seeds; paired differences per seed with mean +- std [95% t-interval] (n = seeds); test split.", ""]
    L += ["## 1. Main: every model (variant `%s`), paired difference vs `%s`" % (default, ref), "",
          f"| model | seeds | AUC | GAUC | logloss | oracle gap | AUC - {ref} | GAUC - {ref} |",
          "|---|---|---|---|---|---|---|---|"]
    for r in t["main"]:
        dd = [("reference" if r["model"] == ref else _pd(r[k])) for k in ("d_auc", "d_gauc")]
        L.append(f"| {r['model']} | {r['n']} | {_m(r['auc'])} | {_m(r['gauc'])} | {_m(r['logloss'])} | "
                 f"{_m(r['oracle_gap'])} | {dd[0]} | {dd[1]} |")
    L += ["", f"## 2. Ablations (variants of {', '.join(st['ablation_models'])}), paired difference vs `{default}`", "",
          f"| model | variant | overrides | seeds | AUC | GAUC | logloss | oracle gap | AUC - {default} | "
          f"GAUC - {default} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in t["ablation"]:
        ov = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["overrides"].items()) or "(none)"
        dd = [("reference" if r["variant"] == default else _pd(r[k])) for k in ("d_auc", "d_gauc")]
        L.append(f"| {r['model']} | {r['variant']} | {ov} | {r['n']} | {_m(r['auc'])} | {_m(r['gauc'])} | "
                 f"{_m(r['logloss'])} | {_m(r['oracle_gap'])} | {dd[0]} | {dd[1]} |")
    if not t["ablation"]:
        L.append(f"| n/a | no cell of {', '.join(st['ablation_models'])} ran | | | | | | | | |")
    L += ["", "## 3. User groups: life-cycle length quantile groups (behaviours before the history end)", "",
          "| model | group | lengths | AUC | GAUC |", "|---|---|---|---|---|"]
    for r in t["groups"]:
        lo, hi = r["lengths"]
        rng = "n/a" if lo is None else f"{int(lo)}-{int(hi)}"
        L.append(f"| {r['model']} | {r['group']} | {rng} | {_m(r['auc'])} | {_m(r['gauc'])} |")
    L += ["", f"Gain of twinv2 over {ref} per group (paired per seed):", "",
          "| group | AUC gain | GAUC gain |", "|---|---|---|"]
    if t["group_gain"]:
        for r in t["group_gain"]:
            L.append(f"| {r['group']} | {_pd(r['auc'])} | {_pd(r['gauc'])} |")
    else:
        L.append(f"| n/a | twinv2 and {ref} were not both run | |")
    L += ["", "## 4. Diversity", "",
          "| model | retrieval distinct categories | retrieval entropy (nats) | top-N coverage | top-N ILD |",
          "|---|---|---|---|---|"]
    for r in t["diversity"]:
        L.append(f"| {r['model']} | {_m(r['retrieval.distinct_categories'], 2)} | {_m(r['retrieval.entropy'], 3)} | "
                 f"{_m(r['ranking.coverage'], 3)} | {_m(r['ranking.ild'], 3)} |")
    L += ["", "## 5. Cost", "",
          "| model | GSU positions / candidate (max) | multiply-adds / candidate | train s | training samples/s | "
          "evaluate s | peak RSS MB | epochs run (gbdt: trees) |", "|---|---|---|---|---|---|---|---|"]
    for r in t["cost"]:
        gsu = "none" if r["gsu_positions"][0] is None else f"{r['gsu_positions'][0]:.0f}"
        macs = r.get("macs_per_candidate", (None, None))[0]
        macs = "none" if macs is None else f"{macs:,.0f}"
        L.append(f"| {r['model']} | {gsu} | {macs} | {_m(r['train_s'], 1)} | {_m(r['samples_per_s'], 0)} | "
                 f"{_m(r['evaluate_s'], 1)} | {_m(r['peak_rss_mb'], 0)} | {_m(r['epochs_run'], 1)} |")
    L += ["", "Cluster versions (offline clustering; seconds as measured when the version was built):", "",
          "| variants | version | behaviours | clusters | compression | clustering s per 10^6 behaviours |",
          "|---|---|---|---|---|---|"]
    for c in clusters:
        L.append(f"| {', '.join(c['variants'])} | {c['version']} | {c['n_behaviours'] or 'n/a'} | "
                 f"{c['n_clusters'] or 'n/a'} | {_f(c['compression'], 2)} | {_f(c['s_per_1e6_behaviours'], 1)} |")
    L += ["", "Compute of the matrix: %.0f s of train + evaluate over %d cells (sum of the cells' own times)."
          % (sum(sum(float(r["cost"].get(k) or 0) for k in ("train_s", "evaluate_s")) for r in meta.get("records", [])),
             meta["n_cells"])]
    if "wall_s" in meta:
        L.append("This invocation: %.0f s wall, %d cells computed, %d already done."
                 % (meta["wall_s"], meta.get("computed", 0), meta.get("skipped", 0)))
    adopted: dict[tuple, list[str]] = {}
    for r in meta.get("records", []):
        if isinstance(r.get("adopted"), dict):
            adopted.setdefault((r["adopted"].get("from"), r["adopted"].get("commit")), []).append(r["label"])
    for (src, commit), labels in adopted.items():
        L.append("%d cells were adopted from `%s` (computed at commit `%s`; same cell keys: same params, cluster "
                 "versions and data): %s." % (len(labels), src, commit, ", ".join(labels)))
    if meta.get("plots"):
        L += ["", "Plots: " + ", ".join(f"[{Path(p).name}](plots/{Path(p).name})" for p in meta["plots"])]
    return "\n".join(L) + "\n"


def plots(out: Path, t: dict, st: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:                          # pragma: no cover - matplotlib is a dependency
        return []
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        with atomic_path(folder / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(str(folder / name))

    def bars(rows, keyname, title, fname):
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows) + 2), 3.5))
        xs = list(range(len(rows)))
        for j, (k, off) in enumerate((("auc", -0.2), ("gauc", 0.2))):
            m = [r[k][0] or 0 for r in rows]
            e = [r[k][1] or 0 for r in rows]
            ax.bar([x + off for x in xs], m, 0.4, yerr=e, capsize=3, label=k.upper())
        ax.set_xticks(xs, [r[keyname] for r in rows], rotation=30, ha="right", fontsize=8)
        lo = min([r[k][0] for r in rows for k in ("auc", "gauc") if r[k][0] is not None] or [0.5])
        ax.set(ylim=(max(0.0, lo - 0.05), None), title=title)
        ax.legend(fontsize=8)
        save(fig, fname)

    if t["main"]:
        bars(t["main"], "model", "AUC / GAUC per model (mean +- std over seeds)", "main.png")
    if t["ablation"]:
        bars(t["ablation"], "variant", "Ablations: AUC / GAUC per variant", "ablations.png")
    if t["groups"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for m in dict.fromkeys(r["model"] for r in t["groups"]):
            rows = [r for r in t["groups"] if r["model"] == m]
            ax.errorbar([r["group"] for r in rows], [r["gauc"][0] if r["gauc"][0] is not None else float("nan")
                                                     for r in rows],
                        yerr=[r["gauc"][1] or 0 for r in rows], marker="o", capsize=3, label=m)
        ax.set(xlabel="life-cycle length group (short -> long)", ylabel="GAUC", title="GAUC vs history length")
        ax.legend(fontsize=7)
        save(fig, "groups.png")
    return written


def flat_metrics(t: dict, st: dict) -> dict:
    """One level of {name: number} for `dvc metrics` / `dvc exp show`: per model the mean AUC, GAUC, logloss,
    oracle gap and the paired AUC/GAUC difference vs the reference; per ablation variant the same."""
    out: dict[str, float] = {}
    for r in t["main"]:
        for k in ("auc", "gauc", "logloss", "oracle_gap"):
            if r[k][0] is not None:
                out[f"{r['model']}.{k}"] = round(r[k][0], 6)
        for k in ("d_auc", "d_gauc"):
            if r.get(k) and r[k]["mean"] is not None:
                out[f"{r['model']}.{k}_vs_{st['reference']}"] = round(r[k]["mean"], 6)
    for r in t["ablation"]:
        if r["variant"] == st["default"]:
            continue
        for k in ("auc", "gauc"):
            if r[k][0] is not None:
                out[f"{r['model']}@{r['variant']}.{k}"] = round(r[k][0], 6)
        for k in ("d_auc", "d_gauc"):
            if r.get(k) and r[k]["mean"] is not None:
                out[f"{r['model']}@{r['variant']}.{k}_vs_{st['default']}"] = round(r[k]["mean"], 6)
    return out


def more_plots(out: Path, records: list[dict], st: dict, clusters: list[dict]) -> list[str]:
    """Training curves (valid GAUC per epoch of every default-variant cell) and, when gamma variants ran,
    compression and AUC vs gamma."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        with atomic_path(folder / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(str(folder / name))

    default = [r for r in records if r["variant"] == st["default"] and r.get("curve")]
    if default:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["model"] for r in default))}
        for r in default:
            ep = [h["epoch"] for h in r["curve"]]
            ax.plot(ep, [h["valid_gauc"] for h in r["curve"]], "o-", color=colours[r["model"]], alpha=0.8,
                    label=r["model"] if r["seed"] == min(x["seed"] for x in default if x["model"] == r["model"]) else None)
        ax.set(xlabel="epoch", ylabel="valid GAUC", title="training curves (every seed)")
        ax.legend(fontsize=7)
        save(fig, "curves.png")
    # gamma: the default variant and the variants that change cluster.gamma only
    by_gamma: dict[float, dict] = {}
    comp = {c["version"]: c.get("compression") for c in clusters}
    for r in records:
        if r["model"] not in st["ablation_models"] or set(r.get("overrides") or {}) - {"cluster.gamma"}:
            continue
        g = (r.get("cluster_params") or {}).get("gamma")
        if g is None:
            continue
        e = by_gamma.setdefault(float(g), {"auc": [], "compression": comp.get(r.get("cluster_version"))})
        e["auc"].append(r["metrics"].get("auc"))
    if len(by_gamma) >= 2:
        gs = sorted(by_gamma)
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.plot(gs, [by_gamma[g]["compression"] or float("nan") for g in gs], "s-", color="C1", label="compression")
        ax.set(xlabel="gamma (max cluster size)", ylabel="behaviours per cluster", xscale="log")
        ax2 = ax.twinx()
        ms = [mean_std(by_gamma[g]["auc"]) for g in gs]
        ax2.errorbar(gs, [m[0] if m[0] is not None else float("nan") for m in ms], yerr=[m[1] or 0 for m in ms],
                     marker="o", color="C0", capsize=3, label="AUC")
        ax2.set(ylabel="test AUC")
        ax.set_title("compression and AUC vs gamma")
        fig.legend(fontsize=7, loc="upper left")
        save(fig, "gamma.png")
    return written


def report(out: str | Path, records: list[dict], st: dict, meta: dict, clusters: list[dict]) -> dict:
    """OUT/results.json (every cell + the tables) and OUT/results.md (+ OUT/plots/*.png)."""
    out = Path(out)
    models = list(dict.fromkeys(meta["models"]))
    variants = list(dict.fromkeys(meta["variants"]))
    t = tables(records, st, models, variants)
    meta = {**meta, "plots": plots(out, t, st) + more_plots(out, records, st, clusters)}
    md = markdown(t, st, {**meta, "records": records}, clusters)
    cells = [{k: r.get(k) for k in RECORD_KEYS + (("adopted",) if "adopted" in r else ())} for r in records]
    write_json(out / "results.json", {"meta": meta, "cells": cells, "tables": t, "clusters": clusters})
    write_json(out / "metrics.json", flat_metrics(t, st))
    with atomic_path(out / "results.md") as tmp:
        Path(tmp).write_text(md)
    return {"tables": t, "markdown": md, "plots": meta["plots"]}


BEGIN, END = "<!-- twinv2 benchmark: begin (generated, do not edit) -->", "<!-- twinv2 benchmark: end -->"


def publish(results_md: str | Path, doc: str | Path) -> Path:
    """Put OUT/results.md into a document between the BEGIN/END markers (replacing what was there; appended
    with the markers when absent), so that the document's tables are the generated report, never hand-copied.
    The report's headings are demoted one level. The document travels without the benchmark directory (which
    holds every cell's model): OUT/plots/*.png and OUT/results.json are copied to DOC's folder under
    `<doc stem>_files/` (replaced on each publish) and the plot links point there."""
    results_md, doc = Path(results_md), Path(doc)
    body = results_md.read_text()
    files = doc.parent / f"{doc.stem}_files"
    src_plots = results_md.parent / "plots"
    files.mkdir(parents=True, exist_ok=True)
    with atomic_dir(files / "plots") as tmp_plots:       # the old plots stay whole until the new set is complete
        for png in sorted(src_plots.glob("*.png")) if src_plots.is_dir() else ():
            shutil.copy2(png, tmp_plots / png.name)
    if (results_md.parent / "results.json").exists():
        with atomic_path(files / "results.json") as tmp:
            shutil.copyfile(results_md.parent / "results.json", tmp)
    body = "\n".join(("#" + line) if line.startswith("#") else line for line in body.splitlines())
    body = body.replace("](plots/", f"]({files.name}/plots/")
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    text = doc.read_text() if doc.exists() else ""
    if BEGIN in text and END in text.split(BEGIN, 1)[1]:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    with atomic_path(doc) as tmp:
        Path(tmp).write_text(text)
    return doc


# ------------------------------------------------------------------------------------------ the whole
def bench_id(out: str | Path) -> str:
    p = Path(out).resolve()
    return f"{p.name}-{digest(str(p), 8)}"


def run(data: str | Path, out: str | Path, params: dict | None = None, models=None, seeds=None, variants=None,
        command: str | None = None, only: Iterable[str] | None = None, publish_to: str | Path | None = None,
        adopt_from: str | Path | None = None) -> dict:
    """Every cell of the plan, then the report; `only` (MODEL/VARIANT/SEED names): just those cells, no
    report (what the DVC cell stages run; the report stage runs the whole plan, computing nothing new).
    `adopt_from`: an earlier results.json whose cells with the same key are taken as done (`adopt`)."""
    params = params or load_params()
    st = settings(params)
    data, out = Path(data), Path(out)
    planned = plan(params, models, seeds, variants)
    if only:
        planned = select(planned, only)
    out.mkdir(parents=True, exist_ok=True)
    cells = prepare(data, params, planned)
    adopted = adopt(out, cells, adopt_from) if adopt_from else None
    if only:
        recs = [run_cell(data, out, c) for c in cells]
        n = sum(1 for r in recs if not r.get("skipped"))
        return {"cells": len(cells), "computed": n, "skipped": len(cells) - n,
                "summary": f"benchmark: cells {', '.join(label(c) for c in cells)} ({n} computed) -> {out / 'cells'}"}
    write_json(out / "plan.json", [{k: c[k] for k in ("label", "model", "variant", "seed", "key", "cluster_version",
                                                      "overrides")} for c in cells])
    track = None
    from pipelines import tracking

    if tracking.tracking_wanted():
        ctx = {"dag_id": "twinv2_benchmark_cli", "run_id": bench_id(out), "try_number": 1, "map_index": -1}
        parent = tracking.parent_run(ctx, data=data, params={k: v for k, v in params.items()})
        track = (ctx, parent)
    t0 = time.perf_counter()
    records = []
    for c in cells:
        records.append(run_cell(data, out, c, track))
    computed = sum(1 for r in records if not r.get("skipped"))
    meta = build_meta(data, cells, command or "twinv2 benchmark", wall_s=time.perf_counter() - t0,
                      computed=computed, skipped=len(records) - computed,
                      **({"adopted": adopted} if adopted else {}))
    rep = report(out, [read_json(cell_dir(out, c) / "cell.json") for c in cells], st, meta,
                 clusters_of(data, cells))
    if publish_to:
        publish(out / "results.md", publish_to)
    if track is not None:
        c = tracking.client()
        tracking.log_paths(c, track[1], [out / "results.json", out / "results.md", out / "plots"], "benchmark")
        tracking.finish(c, track[1], ok=True)
    summary = (f"benchmark: {len(cells)} cells ({computed} computed, {len(records) - computed} already done) -> "
               f"{out / 'results.md'}")
    return {"cells": len(cells), "computed": computed, "skipped": len(records) - computed,
            "results": str(out / "results.json"), "markdown": str(out / "results.md"), "summary": summary}


def clusters_of(data, cells: list[dict]) -> list[dict]:
    by: dict[str, list[str]] = {}
    for c in cells:
        if c.get("cluster_version"):
            by.setdefault(c["cluster_version"], [])
            if c["variant"] not in by[c["cluster_version"]]:
                by[c["cluster_version"]].append(c["variant"])
    return [{**cluster_summary(data, v), "variants": vs} for v, vs in by.items()]


def build_meta(data, cells: list[dict], command: str, **extra) -> dict:
    from pipelines import tracking

    return {"command": command, "git_commit": tracking.git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "data": str(Path(data)),
            "models": list(dict.fromkeys(c["model"] for c in cells)),
            "variants": list(dict.fromkeys(c["variant"] for c in cells)),
            "seeds": sorted({int(c["seed"]) for c in cells}), "n_cells": len(cells), **extra}


def report_from_dir(data, out: str | Path, cells: list[dict], params: dict, command: str, **extra) -> dict:
    """The report of cells already computed (the DAG's report task): every cell must be done."""
    st = settings(params)
    missing = [label(c) for c in cells if not is_done(out, c)]
    if missing:
        raise RuntimeError(f"{out}: cells not done: {missing}; run them first")
    records = [read_json(cell_dir(out, c) / "cell.json") for c in cells]
    meta = build_meta(data, cells, command, **extra)
    return report(out, records, st, meta, clusters_of(data, cells))


