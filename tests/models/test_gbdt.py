"""gbdt: the vectorised life-cycle statistics equal a plain per-sample loop, never read a behaviour at or
after the sample, the trees stored as arrays score exactly as scikit-learn, and train/evaluate/serving
work in the harness on the tiny world (no clusters needed)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from twinv2.models.gbdt import (FEATURE_NAMES, FEATURES, Featurizer, GBDTModel, feature_names, fit, gbdt_params,
                                reference_features)


def _behaviours(data) -> pd.DataFrame:
    from twinv2.data.schema import DatasetPaths
    from twinv2.data.store import read_table

    b = read_table(DatasetPaths(data).behaviors("validated"), "behaviors").to_pandas()
    return b[["user_id", "item_id", "ts", "play_ms", "duration_ms"]].sort_values(["user_id", "ts"], kind="stable")


def _featurize(beh: pd.DataFrame, vocab, imp: pd.DataFrame, **windows) -> np.ndarray:
    """Features of impressions from a behaviours table through the CSR store (the library path)."""
    from twinv2.data.store import UserHistories
    from twinv2.training.samples import make_samples, raw_features

    hist = UserHistories.from_table(beh.reset_index(drop=True))
    raw = raw_features(hist, vocab)
    feat = Featurizer(hist, raw.item, raw.author, raw.category, vocab, **windows)
    return feat(make_samples(imp.reset_index(drop=True), hist, vocab))


@pytest.fixture(scope="module")
def tiny(tiny_validated_ro):
    from twinv2.training.world import load_world

    return load_world(tiny_validated_ro), _behaviours(tiny_validated_ro)


def _edge_impressions(world, beh: pd.DataFrame) -> pd.DataFrame:
    """Impressions that exercise the edges: a sample at exactly a behaviour's ts (excluded), before a user's
    first behaviour (empty history), an unknown user, an unknown item, an item the user watched."""
    first = beh.groupby("user_id").head(1).iloc[0]
    mid = beh.iloc[len(beh) // 2]
    known = int(world.items["item_id"].iloc[0])
    rows = [(int(mid.user_id), int(mid.item_id), int(mid.ts)),            # ts == a behaviour's ts, its own item
            (int(mid.user_id), known, int(mid.ts) + 1),
            (int(first.user_id), known, int(first.ts)),                   # nothing before it
            (int(first.user_id), known, int(first.ts) - 10**9),
            (10**9, known, int(mid.ts)),                                  # a user without history
            (int(mid.user_id), 10**9, int(mid.ts))]                       # an item outside the catalogue
    return pd.DataFrame(rows, columns=["user_id", "item_id", "ts"]).assign(label=0, split="test")


@pytest.mark.parametrize("windows", [{}, {"recent_n": 7, "recent_frac": 0.25}])
def test_features_equal_the_per_sample_loop(tiny, windows):
    world, beh = tiny
    imp = pd.concat([world.impressions[["user_id", "item_id", "ts", "label", "split"]], _edge_impressions(world, beh)],
                    ignore_index=True)
    got = _featurize(beh, world.vocab, imp, **windows)
    ref = reference_features(beh, world.items, imp, **windows)
    assert got.shape == ref.shape == (len(imp), len(FEATURE_NAMES))
    for j, name in enumerate(FEATURE_NAMES):
        np.testing.assert_allclose(got[:, j], ref[:, j], rtol=1e-9, atol=1e-12, equal_nan=True,
                                   err_msg=f"feature {name}: vectorised != per-sample loop")
    # the edges really are edges (so the comparison above covers them)
    edge = got[-6:]
    col = {n: j for j, n in enumerate(FEATURE_NAMES)}
    assert edge[0, col["item_count_log"]] == ref[-6, col["item_count_log"]]
    assert edge[2, col["log_hist_len"]] == 0 and np.isnan(edge[2, col["cat_share"]])
    assert edge[4, col["log_hist_len"]] == 0 and np.isnan(edge[5, col["log_duration"]])
    # the world's own samples: every feature varies (none is constant by mistake)
    X = got[:-6]
    for j, name in enumerate(FEATURE_NAMES):
        v = X[:, j][np.isfinite(X[:, j])]
        assert len(np.unique(v)) > 1, f"feature {name} is constant on the tiny world"


def test_featurizer_of_a_world_equals_the_store_path(tiny):
    world, beh = tiny
    s = world.samples("test")
    imp = world.impressions[world.impressions.split == "test"]
    np.testing.assert_array_equal(Featurizer.from_world(world)(s), _featurize(beh, world.vocab, imp))


def test_features_ignore_behaviours_at_or_after_the_sample(tiny):
    """Changing every behaviour at or after t0 (any user: other items, play times, extra rows at exactly t0,
    dropped rows) leaves the features of every sample with ts <= t0 unchanged; later samples do change."""
    world, beh = tiny
    imp = world.impressions[["user_id", "item_id", "ts", "label", "split"]].reset_index(drop=True)
    t0 = int(np.sort(imp["ts"].to_numpy())[len(imp) // 2])                # a sample's own ts
    rng = np.random.default_rng(0)
    late = beh["ts"].to_numpy() >= t0
    changed = beh.copy()
    items = world.items["item_id"].to_numpy()
    changed.loc[late, "item_id"] = rng.choice(items, int(late.sum())).astype(changed["item_id"].dtype)
    changed.loc[late, "play_ms"] = rng.integers(0, 10**6, int(late.sum())).astype(changed["play_ms"].dtype)
    changed = changed.drop(changed.index[late][::3])
    extra = imp[imp.ts >= t0][["user_id", "item_id", "ts"]].assign(ts=t0, play_ms=5000, duration_ms=10000)
    changed = pd.concat([changed, extra], ignore_index=True).sort_values(["user_id", "ts"], kind="stable")
    before, after = _featurize(beh, world.vocab, imp), _featurize(changed, world.vocab, imp)
    early = (imp["ts"] <= t0).to_numpy()
    assert early.sum() > 100 and (~early).sum() > 100
    # counts are exact; completion sums are differences of cumulative sums (rounding ~1e-12, a leaked
    # behaviour moves a mean by ~1e-3 or more)
    np.testing.assert_allclose(after[early], before[early], rtol=1e-9, atol=1e-12, equal_nan=True,
                               err_msg="a feature of a sample read a behaviour at or after its ts")
    differ = ~np.isclose(before[~early], after[~early], equal_nan=True)
    assert differ.any(axis=1).mean() > 0.5, "the alteration should change later samples (else the test is void)"


def test_trees_as_arrays_score_as_sklearn(tiny, tmp_path):
    world, _ = tiny
    feat = Featurizer.from_world(world)
    tr, va = world.samples("train"), world.samples("valid")
    X, Xv = feat(tr), feat(va)
    assert np.isnan(X).any()                                            # missing values are routed too
    est = fit(X, tr.label, Xv, va.label, {"max_iter": 30, "early_stopping": False}, seed=0)
    model = GBDTModel.from_sklearn(est)
    np.testing.assert_allclose(model.predict_raw(Xv), est.decision_function(Xv), rtol=1e-10, atol=1e-10)
    staged = list(est.staged_decision_function(Xv))
    np.testing.assert_allclose(GBDTModel.from_sklearn(est, 11).predict_raw(Xv), staged[10], rtol=1e-10, atol=1e-10)
    torch.save(model.to_state(), tmp_path / "model.pt")
    back = GBDTModel.from_state(torch.load(tmp_path / "model.pt", weights_only=True))
    np.testing.assert_array_equal(back.predict_raw(Xv), model.predict_raw(Xv))
    with pytest.raises(ValueError, match="shape"):
        model.predict_raw(Xv[:, :3])
    with pytest.raises(ValueError, match="retrain"):
        GBDTModel.from_state(model.to_state(), feature_names=["other"])
    with pytest.raises(ValueError, match="lacks"):
        GBDTModel.from_state({"baseline": torch.zeros(1)})


def test_params():
    p = gbdt_params({"train": {}, "gbdt": {"max_iter": 5}})
    assert p["max_iter"] == 5 and p["learning_rate"] == 0.05
    assert gbdt_params({"train": {}})["max_iter"] == 200                # no section: the defaults
    with pytest.raises(ValueError, match="max_iters"):
        gbdt_params({"gbdt": {"max_iters": 5}})
    with pytest.raises(ValueError, match="recent_frac"):
        gbdt_params({"gbdt": {"recent_frac": 0}})
    from twinv2.config import load_params

    assert set(load_params()["gbdt"]) == set(gbdt_params(None)), "params.yaml gbdt: and DEFAULTS disagree"
    assert set(FEATURES) == set(FEATURE_NAMES)


@pytest.fixture(scope="module")
def planted(tiny_validated_ro, tmp_path_factory):
    """The tiny world (validated, NOT clustered) with label = 1 iff the target's category is among the
    user's last 48 behaviours before the history end (tests/training/conftest.py's planted signal)."""
    from tests.training.conftest import _recent_and_old_categories, _relabel

    dest = tmp_path_factory.mktemp("gbdt_planted") / "world"
    shutil.copytree(tiny_validated_ro, dest)
    items, recent, _ = _recent_and_old_categories(dest, 48)
    _relabel(dest, lambda imp: np.array([c in recent.get(u, ()) for u, c in
                                         zip(imp.user_id, items.reindex(imp.item_id).to_numpy())]))
    return dest


def test_train_and_evaluate_in_the_harness(planted, params, tmp_path):
    from pipelines import evaluate, train
    from twinv2.training.scoring import RunScorer

    p = json.loads(json.dumps(params))
    p["gbdt"].update(max_iter=60)
    p["evaluate"].update(diversity_users=10, diversity_pool=50, plots=True)
    out = tmp_path / "run"
    assert not (planted / "clusters").exists()
    rep = train.run(planted, "gbdt", out, params=p)
    for f in ("config.json", "vocab.npz", "model.pt", "train_metrics.json"):
        assert (out / f).exists(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "gbdt" and cfg["long_source"] == "none" and cfg["feature_names"] == list(feature_names(True))
    sd = torch.load(out / "model.pt", weights_only=True)                  # no pickle
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    for key in ("best_valid_gauc", "best_epoch", "epochs_run", "wall_s", "total_wall_s", "summary", "history"):
        assert key in rep, key
    assert 1 <= rep["best_epoch"] <= rep["epochs_run"] <= 60 and rep["best_valid_gauc"] > 0.8
    assert rep["best_valid_gauc"] == max(h["valid_gauc"] for h in rep["history"])
    m = evaluate.run(planted, out, params=p)
    for key in ("auc", "gauc", "logloss", "oracle_auc", "oracle_gap", "by_group", "calibration", "ece", "diversity"):
        assert m.get(key) is not None, key
    assert m["model"] == "gbdt" and m["auc"] > 0.9, m["summary"]
    assert sum(g["n_impressions"] for g in m["by_group"]) == m["n_test"]
    assert m["diversity"]["retrieval"]["distinct_categories"] is None        # no GSU: not applicable
    assert 0 < m["diversity"]["ranking"]["coverage"] <= 1
    assert json.loads((out / "metrics.json").read_text())["auc"] == m["auc"]
    # serving: one user at one time == per-row scoring; an unknown user scores too
    s = RunScorer(out, data=planted)
    items = s.world.items["item_id"].to_numpy()[::37][:40]
    for user in (int(s.world.hist.user_ids[0]), 10**9):
        ts = s.default_ts()
        ref = s.predict_frame(pd.DataFrame({"user_id": user, "item_id": items, "ts": ts}))["prob"]
        np.testing.assert_allclose(s.score_user(user, items, ts), ref, rtol=1e-12)
        np.testing.assert_allclose(s.score_frame(pd.DataFrame({"user_id": user, "item_id": items, "ts": ts})), ref)
    # the same seed gives the same trees
    rep2 = train.run(planted, "gbdt", tmp_path / "again", params=p)
    assert rep2["best_epoch"] == rep["best_epoch"]
    again = torch.load(tmp_path / "again" / "model.pt", weights_only=True)
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def test_real_labels_and_cli(tiny_validated_ro, params, tmp_path):
    """On the tiny world's own labels gbdt beats chance; the CLI accepts --model gbdt; bad names and flags
    are refused with the list of models / the reason."""
    from pipelines import cli, evaluate, train

    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(tiny_validated_ro), "--model", "gbdt", "--out", str(out)]) == 0
    p = json.loads(json.dumps(params))
    p["evaluate"].update(diversity_users=5, diversity_pool=20, plots=False)
    m = evaluate.run(tiny_validated_ro, out, params=p)
    assert m["auc"] > 0.57, m["summary"]
    with pytest.raises(ValueError, match="gbdt"):
        train.run(tiny_validated_ro, "gbdtt", tmp_path / "x", params=params)
    with pytest.raises(ValueError, match="warm-start"):
        train.run(tiny_validated_ro, "gbdt", tmp_path / "x", params=params, warm_start=out)


@pytest.mark.slow
def test_gbdt_logs_to_mlflow(planted, params, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    from pipelines import evaluate, train
    from twinv2.training.scoring import RunScorer

    p = json.loads(json.dumps(params))
    p["gbdt"].update(max_iter=20)
    p["evaluate"].update(diversity_users=5, diversity_pool=20, plots=False)
    out = tmp_path / "run"
    with mlflow.start_run(run_name="stage") as active:
        train.run(planted, "gbdt", out, params=p)
        evaluate.run(planted, out, params=p)
    run = mlflow.get_run(active.info.run_id)
    assert run.data.params["gbdt.max_iter"] == "20" and run.data.tags["model"] == "gbdt"
    for k in ("best_valid_gauc", "epoch_valid_gauc", "auc", "gauc"):          # as the neural path logs them
        assert k in run.data.metrics, k
    model = mlflow.pyfunc.load_model(f"runs:/{active.info.run_id}/model")
    from twinv2.data.store import read_table

    imp = read_table(planted / "validated" / "impressions.parquet", "impressions").to_pandas()
    x = imp[imp.split == "test"][["user_id", "item_id", "ts"]].head(20).reset_index(drop=True)
    np.testing.assert_allclose(model.predict(x)["score"].to_numpy(), RunScorer(out).predict_frame(x)["prob"],
                               rtol=1e-9)


def test_fit_accepts_a_feature_column_without_any_value():
    """A log without durations gives an all-NaN column; the fit must not fail and the stored trees score
    rows (NaN there or not) exactly as scikit-learn does."""
    from twinv2.models.gbdt import GBDTModel, fit

    rng = np.random.default_rng(0)
    F = len(FEATURE_NAMES)
    X = rng.random((300, F))
    X[:, 2] = np.nan
    y = (X[:, 0] + 0.3 * rng.random(300) > 0.6).astype(int)
    est = fit(X, y, None, None, {"max_iter": 20, "early_stopping": False})
    m = GBDTModel.from_sklearn(est)
    Xq = rng.random((50, F))
    Xq[:, 2] = np.nan
    np.testing.assert_allclose(m.predict_raw(Xq), est.decision_function(np.where(np.isnan(Xq), 0.0, Xq)), rtol=1e-9)
    np.testing.assert_allclose(m.predict_raw(Xq), m.predict_raw(np.where(np.isnan(Xq), 0.0, Xq)), rtol=1e-12)


def test_user_feedback_features_equal_the_per_sample_loop(tiny):
    """gbdt.user_feedback: the two extra columns through World.samples (the library path) equal the plain loop over
    the labelled impressions (train split, strictly earlier); the other 23 columns are unchanged."""
    world, beh = tiny
    s = world.samples(None)
    imp = world.impressions[["user_id", "item_id", "ts", "label", "split"]]
    got = Featurizer.from_world(world, user_feedback=True)(s)
    sub = np.arange(len(imp))[::3]      # the plain loop on every third sample (the fast tier's budget; the 23
    ref = reference_features(beh, world.items, imp.iloc[sub], feedback=imp)   # base columns: every row above)
    assert got.shape == (len(imp), len(FEATURE_NAMES) + 2) and ref.shape == (len(sub), got.shape[1])
    np.testing.assert_allclose(got[sub], ref, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(got[:, :len(FEATURE_NAMES)], Featurizer.from_world(world)(s))
    n = np.rint(np.expm1(got[:, -2]))
    assert n.max() > 0 and np.isnan(got[n == 0, -1]).all()
    test = (imp["split"] == "test").to_numpy()
    first_test = imp.loc[test].groupby("user_id")["ts"].transform("min").to_numpy() == imp.loc[test, "ts"].to_numpy()
    train_n = imp[imp.split == "train"].groupby("user_id").size()
    # a test sample counts all of its user's train labels (they are all earlier) and no test label
    want = imp.loc[test, "user_id"].map(train_n).fillna(0).to_numpy()
    np.testing.assert_array_equal(n[test][first_test], want[first_test])
    np.testing.assert_array_equal(n[test], want)
