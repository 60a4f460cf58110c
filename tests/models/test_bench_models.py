"""bench/bench_models.py builds its synthetic batches with every input the committed model params read (target
popularity and stats, completion, whole-life counts): one timed step of TWIN and TWIN-V2 and the cached scoring
run on them (a batch missing an input fails here, not first on a lent GPU)."""
import math

from bench import bench_models


def test_one_training_step_of_each_model_runs_on_the_synthetic_batches():
    for kind in ("twin", "twinv2"):
        r = bench_models.train_one(kind, length=200, batch_size=4, steps=1, compression=10)
        assert r["model"] == kind and r["long_len"] == (200 if kind == "twin" else 20)
        assert r["samples_per_s"] > 0 and math.isfinite(r["step_s_median"])


def test_cached_scoring_equals_inline_scoring():
    r = bench_models.scoring(n_candidates=20, n_clusters=50, reps=2)
    assert r["max_abs_score_diff"] < 1e-4
    assert r["inline"]["p50_ms"] > 0 and r["cached"]["p50_ms"] > 0
