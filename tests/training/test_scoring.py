"""The fast scoring paths (RunScorer.score_user: one user x many candidates, the serving path; score_many: many
users' candidates grouped by (user, ts), the batch path) against the reference (predict_frame: every row a
training sample through SampleSet and the training forward), on the tiny world, for TWIN-V2 (clusters, gap
rows, life-cycle counts, the user's label counts) and TWIN (raw history): same scores within fp32 tolerance,
including unknown users and items, users without history, padding (short histories) and several times."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines import train
from twinv2.training.scoring import RunScorer

TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def runs(planted_ro, params, tmp_path_factory):
    import copy

    from tests.training.conftest import SMALL_MODEL

    p = copy.deepcopy(params)
    p["model"].update(SMALL_MODEL, user_feedback=True, target_pop=True)      # every head input the fast path builds
    p["train"].update(lr=0.005, batch_size=128, epochs=1, patience=10, progress=False, num_workers=0)
    out = {}
    for name in ("twinv2", "twin"):
        d = tmp_path_factory.mktemp(f"score_{name}") / "run"
        train.run(planted_ro, name, d, params=p)
        out[name] = RunScorer(d, data=planted_ro)
    return out


def _cases(s: RunScorer):
    users, lengths = s.world.user_lengths()
    has = users[lengths > 0]
    busiest = int(users[np.argmax(lengths)])
    shortest = int(has[np.argmin(lengths[lengths > 0])])
    items = s.world.items["item_id"].to_numpy()
    cand = np.concatenate([items[::23][:60], [10**12, items[0], items[0]]])        # an unknown item, a repeat
    t_end = s.default_ts()
    t_mid = (int(s.world.meta["history_end_ms"]) + t_end) // 2                    # gap rows [W, ts) differ
    return [(busiest, cand, t_end), (busiest, cand, t_mid), (shortest, cand, t_mid), (10**9, cand, t_end)]


@pytest.mark.parametrize("name", ["twinv2", "twin"])
def test_one_user_fast_path_equals_reference(runs, name):
    s = runs[name]
    for user, items, ts in _cases(s):
        ref = s.predict_frame(pd.DataFrame({"user_id": user, "item_id": items, "ts": ts}))["prob"]
        fast = s.score_user(user, items, ts)
        np.testing.assert_allclose(fast, ref, **TOL, err_msg=f"{name} user {user} ts {ts}")
        assert np.isfinite(fast).all()
    assert s.score_user(1, np.zeros(0, np.int64)).shape == (0,)


@pytest.mark.parametrize("name", ["twinv2", "twin"])
def test_batch_path_equals_reference_in_row_order(runs, name):
    s = runs[name]
    rows = [(u, i, t) for u, items, t in _cases(s) for i in items]
    rng = np.random.default_rng(0)
    rows = [rows[k] for k in rng.permutation(len(rows))]                          # groups interleaved
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    ref = s.predict_frame(df)["prob"]
    np.testing.assert_allclose(s.score_many(df.user_id, df.item_id, df.ts), ref, **TOL)
    np.testing.assert_allclose(s.score_frame(df), ref, **TOL)                      # what the pyfunc calls
    # a group scored in a batch == the same group scored alone (the serving path)
    u, items, t = _cases(s)[0]
    alone = s.score_user(u, items, t)
    sel = ((df.user_id == u) & (df.ts == t)).to_numpy()
    np.testing.assert_allclose(s.score_many(df.user_id, df.item_id, df.ts)[sel],
                               alone[[list(items).index(i) for i in df.item_id[sel]]], **TOL)


def test_request_without_ts_uses_the_default_time(runs):
    s = runs["twinv2"]
    u, items, _ = _cases(s)[0]
    df = pd.DataFrame({"user_id": u, "item_id": items})
    np.testing.assert_allclose(s.score_frame(df), s.predict_frame(df)["prob"], **TOL)
    with pytest.raises(ValueError, match="item_id"):
        s.score_frame(pd.DataFrame({"user_id": [u]}))
    with pytest.raises(ValueError, match="watermark"):
        s.score_user(u, items, int(s.world.watermark) - 1)


def test_cached_label_counts_equal_feedback_counts(runs):
    s = runs["twinv2"]
    fb = s.world.feedback()
    imp = s.world.impressions
    users = np.concatenate([imp.user_id.to_numpy(np.int64), [10**9, -1]])
    ts = np.concatenate([imp.ts.to_numpy(np.int64), [0, 2**40]])
    n, k = s._feedback_counts(fb, users, ts)
    n0, k0 = fb.counts(users, ts)
    np.testing.assert_array_equal(n, n0)
    np.testing.assert_array_equal(k, k0)


def test_evaluate_ranking_pools_take_the_batch_path_with_the_serving_scores(runs, monkeypatch):
    """pipelines.evaluate's ranking diversity scores every user's pool in one score_many call: the same
    coverage / ILD as one score_user call per user (the path it used before)."""
    from pipelines import evaluate

    s = runs["twinv2"]
    test = s.world.impressions[s.world.impressions["split"] == "test"].reset_index(drop=True)
    ep = {"seed": 3, "diversity_users": 8, "diversity_pool": 40, "diversity_topn": 5}
    batch = evaluate._ranking_diversity(s, test, ep)

    one_group = s.score_many

    def per_user(users, items, ts):                      # the previous code: one serving call per user
        u, i, t = np.asarray(users), np.asarray(items), np.asarray(ts)
        return np.concatenate([one_group(u[u == x], i[u == x], t[u == x]) for x in dict.fromkeys(u.tolist())])

    monkeypatch.setattr(s, "score_many", per_user)
    assert evaluate._ranking_diversity(s, test, ep) == batch
