"""DVC in a fresh git repository made from this working tree, on the tiny world: `dvc repro`, then an
experiment with `dvc exp run -S train.lr=...` that `dvc exp show` lists with both models' metrics (they live
in git-tracked dvc_metrics/, not the ignored runs/), the params of the workspace DVC runs in, the data series
for `dvc plots`, MLflow runs whose dataset digest is the hash dvc.lock records, and the default local remote:
push, the cache removed, pull restoring the same data."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _sh(args, cwd, env_extra=None, timeout=900):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_RUN_ID", None)
    env.update(env_extra or {})
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _clone(tmp_path: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    clone = tmp_path / "clone"
    for f in filter(None, files):
        src = REPO / f
        if src.is_file() and not f.startswith("dvc_metrics/"):
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / f)
    (clone / "dvc.lock").unlink(missing_ok=True)       # a clone of the default world's lock: rebuilt on tiny
    _sh(["git", "init", "-q"], clone)
    _sh(["git", "add", "-A"], clone)
    _sh(["git", "commit", "-q", "-m", "clone"], clone)
    return clone


def _md5s(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _metrics_of(row: dict) -> dict:
    """{metrics file: its data} of one `dvc exp show --json` revision."""
    data = (row.get("data") or {})
    return {f: (v or {}).get("data") for f, v in (data.get("metrics") or {}).items()}


@pytest.mark.slow
def test_dvc_repro_experiment_show_and_remote(tmp_path):
    clone = _clone(tmp_path)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["generate"]["preset"] = "tiny"
    params["train"]["epochs"] = 1
    params["train"]["progress"] = False
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    store = tmp_path / "mlflow"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri}
    _sh(["git", "commit", "-q", "-am", "tiny"], clone)

    dvc = [sys.executable, "-m", "dvc"]
    _sh([*dvc, "repro"], clone, env)
    for model in ("twinv2", "twin"):
        m = json.loads((clone / "dvc_metrics" / model / "metrics.json").read_text())
        assert 0.0 <= m["gauc"] <= 1.0 and m["model"] == model and "train.best_valid_gauc" in m
        assert "test_auc" not in m and "diversity.ranking.pool" not in m
        curves = (clone / "dvc_metrics" / model / "curves.csv").read_text().splitlines()
        assert curves[0] == "epoch,train_loss,valid_auc,valid_gauc,valid_logloss" and len(curves) == 2
        assert len((clone / "dvc_metrics" / model / "auc_by_group.csv").read_text().splitlines()) >= 2
    assert "up to date" in _sh([*dvc, "status", "dvc.yaml"], clone).lower()
    # the git-tracked results of the baseline, committed with dvc.lock
    _sh(["git", "add", "dvc.lock", "dvc_metrics"], clone)
    _sh(["git", "commit", "-q", "-m", "baseline"], clone)
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    validated_md5 = next(o["md5"] for o in lock["stages"]["validate"]["outs"] if o["path"] == "data/world/validated")

    # the DVC stages logged to MLflow; the dataset digest is the hash dvc.lock records for validated/
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("twinv2")
    runs = c.search_runs([exp.experiment_id])
    stages = sorted(r.data.tags.get("stage") for r in runs)
    assert stages == ["evaluate", "evaluate", "train", "train"], stages
    for r in runs:
        assert [d.dataset.digest for d in r.inputs.dataset_inputs] == [validated_md5], r.data.tags

    # an experiment: -S edits the workspace's params.yaml, the stages read it, exp show lists both metrics
    _sh([*dvc, "exp", "run", "-S", "train.lr=0.003", "-n", "lr3"], clone, env)
    cfg = json.loads((clone / "runs" / "dvc" / "twinv2" / "config.json").read_text())
    assert cfg["params"]["train"]["lr"] == 0.003
    assert {r.data.params.get("train.lr") for r in c.search_runs([exp.experiment_id], "tags.stage = 'train'")} \
        == {"0.001", "0.003"}
    shown = json.loads(_sh([*dvc, "exp", "show", "--json"], clone))
    rows = []
    for base in shown:
        rows.append((base.get("name") or base.get("rev"), _metrics_of(base)))
        for e in base.get("experiments") or []:
            for r in e.get("revs") or []:
                rows.append((r.get("name") or r.get("rev"), _metrics_of(r)))
    named = {n: m for n, m in rows}
    assert "lr3" in named, list(named)
    for name in ("lr3", next(n for n, _ in rows if n != "lr3" and n != "workspace")):
        m = named[name]
        for model in ("twinv2", "twin"):
            f = f"dvc_metrics/{model}/metrics.json"
            assert m.get(f) and isinstance(m[f].get("gauc"), float), (name, m)
    diff = _sh([*dvc, "metrics", "diff", "HEAD", "lr3", "--json"], clone)
    assert "dvc_metrics/twinv2/metrics.json" in diff and "gauc" in diff
    plots = _sh([*dvc, "plots", "show", "--json"], clone)
    assert "valid_gauc" in plots

    # the default local remote (the workspace holds lr3's results): push, remove the cache and the data,
    # pull restores the same bytes
    remote = (clone / "dvc-remote")
    before = _md5s(clone / "data" / "world" / "raw")
    model_before = hashlib.md5((clone / "runs" / "dvc" / "twinv2" / "model.pt").read_bytes()).hexdigest()
    _sh([*dvc, "push"], clone)
    assert remote.is_dir() and any(remote.rglob("*"))
    shutil.rmtree(clone / ".dvc" / "cache")
    shutil.rmtree(clone / "data" / "world" / "raw")
    (clone / "runs" / "dvc" / "twinv2" / "model.pt").unlink()
    _sh([*dvc, "pull"], clone)
    assert _md5s(clone / "data" / "world" / "raw") == before
    assert hashlib.md5((clone / "runs" / "dvc" / "twinv2" / "model.pt").read_bytes()).hexdigest() == model_before
    assert "up to date" in _sh([*dvc, "status", "dvc.yaml"], clone).lower()


def _stage_params(dvc_yaml: dict) -> dict[str, list[str]]:
    """{stage name as dvc.lock writes it (foreach: 'train@twinv2'): its params.yaml sections}."""
    out = {}
    for name, st in dvc_yaml["stages"].items():
        if "foreach" in st:
            for item in st["foreach"]:
                out[f"{name}@{item}"] = list(st["do"].get("params") or [])
        else:
            out[name] = list(st.get("params") or [])
    return out


def test_dvc_lock_is_current_with_params_yaml():
    """dvc.lock current by construction (issue 32, item 8): every stage of dvc.yaml is locked with exactly the
    params.yaml sections it reads as they are now, and the generate command the lock ran is today's (so
    `dvc status` in a fresh clone flags no stage for its params). Regenerate with `dvc repro` (the default world;
    commit dvc.lock and dvc_metrics/) after changing params.yaml."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = _stage_params(yaml.safe_load((REPO / "dvc.yaml").read_text()))
    assert set(lock) == set(stages), (sorted(set(stages) ^ set(lock)))
    stale = {}
    for name, sections in stages.items():
        recorded = lock[name].get("params", {}).get("params.yaml", {})
        for sec in sections:
            if recorded.get(sec) != params[sec]:
                have, want = recorded.get(sec) or {}, params[sec]
                stale[f"{name}:{sec}"] = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    assert not stale, f"dvc.lock is stale (run `dvc repro` and commit dvc.lock + dvc_metrics/): {stale}"
    g = params["generate"]
    assert lock["generate"]["cmd"] == f"twinv2 generate --preset {g['preset']} --seed {g['seed']} --out data/world"


@pytest.mark.slow
def test_dvc_lock_raw_hash_is_what_the_generator_makes_now(tmp_path):
    """The raw-data hash dvc.lock records is the DVC hash of what `twinv2 generate` produces today with
    params.yaml's generate section (the same md5-of-the-.dir-listing the MLflow dataset digest uses,
    pipelines.tracking.data_hash), and the metrics DVC shows are the ones the locked evaluate wrote."""
    from pipelines import generate, tracking
    from twinv2.config import load_params

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    p = load_params()
    generate.run(preset=p["generate"]["preset"], out=tmp_path / "world", seed=p["generate"]["seed"], params=p)
    raw = next(o for o in lock["generate"]["outs"] if o["path"] == "data/world/raw")
    assert tracking.data_hash(tmp_path / "world", "raw") == raw["md5"], "regenerate dvc.lock with `dvc repro`"
    assert next(d for d in lock["validate"]["deps"] if d["path"] == "data/world/raw")["md5"] == raw["md5"]
    for model in ("twinv2", "twin"):
        m = REPO / "dvc_metrics" / model / "metrics.json"
        out = next(o for o in lock[f"evaluate@{model}"]["outs"] if o["path"] == f"dvc_metrics/{model}/metrics.json")
        assert hashlib.md5(m.read_bytes()).hexdigest() == out["md5"], f"{m} is not what the locked evaluate wrote"
