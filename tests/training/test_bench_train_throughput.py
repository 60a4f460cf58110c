"""bench/bench_train.py --quick on the tiny world (CPU): the JSON has every section with sane values (structure and
sanity, not speed), the old and new end-to-end configurations reach the same validation GAUC (same batches,
same tensors), and bench/bench_gpu.sh runs its --device cpu path (issue 29)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_train

REPO = Path(__file__).resolve().parents[2]


def _check(res: dict):
    assert set(res["input"]) == {"twinv2", "twin"}
    for r in res["input"].values():
        for mode in ("reference", "fast", "fit"):
            assert r[mode]["samples_per_s"] > 0 and r[mode]["samples_per_cpu_s"] > 0
        assert r["samples"] > 0 and math.isfinite(r["speedup_per_core"])
        f = r["fit"]                         # an epoch with the one-time part is slower than its batches alone
        assert f["once_cpu_s"] >= 0 and f["set_size"] >= r["samples"]
        assert 0 < f["epoch_samples_per_cpu_s"] <= f["samples_per_cpu_s"]
    assert {r["model"] for r in res["step"]} == {"twinv2", "twin"}
    for r in res["step"] + res["lengths"]:
        assert r["step_ms"] > 0 and r["samples_per_s"] > 0 and r["peak_mem_mib"] > 0
    assert {(r["model"], r["history"]) for r in res["lengths"]} == {("twinv2", 200), ("twin", 200)}
    assert [r["long_len"] for r in res["lengths"] if r["model"] == "twinv2"] == [20]
    for m in ("twinv2", "twin"):
        e = res["end_to_end"][m]
        assert e["old"]["train_samples_per_s"] > 0 and e["new"]["train_samples_per_s"] > 0
        assert e["speedup"] > 0
        assert e["same_valid_gauc"], e            # the fast path changes no number
    assert res["device"] == "cpu" and res["precision"] == "fp32"


def test_quick_bench_train_json(tmp_path, clustered_ro):
    out = tmp_path / "bench_train.json"
    bench_train.main(["--quick", "--device", "cpu", "--data", str(clustered_ro), "--work", str(tmp_path / "w"),
                      "--out", str(out)])
    res = json.loads(out.read_text())
    _check(res)
    assert "end to end" in out.with_suffix(".txt").read_text()


@pytest.mark.slow
def test_bench_gpu_script_cpu_path(tmp_path, clustered_ro):
    env = dict(os.environ, BENCH_GPU_DEVICE="cpu", BENCH_GPU_QUICK="1", BENCH_GPU_DATA=str(clustered_ro),
               BENCH_GPU_OUT=str(tmp_path / "gpu.json"), PYTHON=sys.executable)
    r = subprocess.run(["bash", "bench/bench_gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["cuda_available"] in (True, False) and res["device"] == "cpu"
    _check(res["bench_train"])
    lb = res["large_batch"]                         # the large-batch end to end with loader processes
    assert "error" not in lb, lb
    assert lb["batch_size"] == 64 and lb["num_workers"] == 2 and lb["train_samples_per_s"] > 0
    assert 0 < lb["best_valid_gauc"] < 1
    sc = res["bench_score"]                         # the scoring half ran on the same device (was never run)
    assert "error" not in sc, sc
    assert sc["one_user"] and sc["batch"] and sc["device"] == "cpu"


def test_compiled_step_row(clustered_ro):
    """--compile: each step row also times the same model (same init, same batch) through torch.compile and
    keeps the compilation's time apart; a failure to compile would be recorded as the row's error, and here
    (gcc present, CPU inductor) there is none."""
    import torch

    from tests.training.conftest import SMALL_MODEL
    from twinv2.config import load_params
    from twinv2.training.world import load_world

    p = load_params()
    p["model"].update(SMALL_MODEL)
    w = load_world(clustered_ro, need_clusters=True, features=p["train"].get("features"))
    (row,) = bench_train.model_steps(w, "twinv2", p, [16], 2, torch.device("cpu"), compile_=True)
    c = row["compiled"]
    assert "error" not in c, c
    assert c["step_ms"] > 0 and c["compile_s"] > 0 and row["compile_speedup"] > 0
    assert "compiled:" in bench_train.table({**_empty(), "step": [row]})


def _empty() -> dict:
    return {"device": "cpu", "precision": "fp32", "torch": "x", "cpu_threads": 1, "data": "d", "input": {},
            "step": [], "lengths": [], "end_to_end": {}}
