"""twinv2.training.feedback against a plain loop, and the leakage rule (strictly earlier train labels only)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinv2.training.feedback import Feedback


def plain(imp: pd.DataFrame, users, ts):
    tr = imp[imp["split"] == "train"]
    n, k = [], []
    for u, t in zip(users, ts):
        m = (tr["user_id"] == u) & (tr["ts"] < t)
        n.append(int(m.sum()))
        k.append(float(tr.loc[m, "label"].sum()))
    return np.array(n), np.array(k)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 30), st.integers(0, 1), st.sampled_from(["train", "valid", "test"])),
                min_size=0, max_size=40),
       st.lists(st.tuples(st.integers(0, 6), st.integers(-1, 32)), min_size=1, max_size=20))
def test_counts_match_the_plain_loop(rows, queries):
    imp = pd.DataFrame(rows, columns=["user_id", "ts", "label", "split"]).astype({"user_id": np.int64, "ts": np.int64})
    fb = Feedback.from_impressions(imp)
    users, ts = np.array([q[0] for q in queries]), np.array([q[1] for q in queries])
    n, k = fb.counts(users, ts)
    wn, wk = plain(imp, users, ts)
    np.testing.assert_array_equal(n, wn)
    np.testing.assert_allclose(k, wk)
    tr = imp[imp["split"] == "train"]
    p0 = np.array([tr.loc[tr["ts"] < t, "label"].mean() if (tr["ts"] < t).any() else 0.5 for t in ts])
    np.testing.assert_allclose(fb.prior(ts), p0, rtol=1e-12)        # every user's train labels strictly before t
    f = fb.head_features(users, ts)
    np.testing.assert_allclose(f[:, 0], np.log1p(wn), rtol=1e-6)
    np.testing.assert_allclose(f[:, 1], (wk + p0) / (wn + 1), rtol=1e-6)


def test_a_sample_never_counts_its_own_or_a_later_or_an_evaluation_label():
    imp = pd.DataFrame({"user_id": [1, 1, 1, 1, 2], "ts": [10, 20, 20, 30, 5], "label": [1, 1, 0, 1, 1],
                        "split": ["train", "train", "train", "test", "train"]})
    fb = Feedback.from_impressions(imp)
    n, k = fb.counts(np.array([1, 1, 1, 1, 3]), np.array([10, 20, 21, 99, 99]))
    assert n.tolist() == [0, 1, 3, 3, 0]          # ts 10 counts nothing (its own), ts 20 only ts 10, the test row never
    assert k.tolist() == [0.0, 1.0, 2.0, 2.0, 0.0]


def test_a_later_label_never_changes_an_earlier_samples_features():
    """The prior p0 too reads only labels strictly before the sample (issue 30: it was the rate of the whole train
    split, so flipping a later label, or the sample's own, moved an earlier sample's feature)."""
    imp = pd.DataFrame({"user_id": [1, 2, 1, 2, 3, 1], "ts": [10, 15, 20, 30, 40, 50], "label": [1, 0, 0, 1, 1, 0],
                        "split": ["train"] * 6})
    users, ts = np.array([1, 2, 1, 2, 3, 1]), np.array([10, 15, 20, 30, 40, 50])
    before = Feedback.from_impressions(imp).head_features(users, ts)
    for j in range(len(imp)):                               # flip each label in turn
        flipped = imp.assign(label=imp["label"].where(np.arange(len(imp)) != j, 1 - imp["label"]))
        after = Feedback.from_impressions(flipped).head_features(users, ts)
        same = ts <= ts[j]                                  # samples at or before the flipped label's time
        np.testing.assert_array_equal(after[same], before[same])
        assert (after[~same] != before[~same]).any(axis=1).all()   # and every later sample reads it
    fb = Feedback.from_impressions(imp)
    np.testing.assert_allclose(fb.prior(np.array([10, 11, 16, 50, 51])), [0.5, 1.0, 0.5, 3 / 5, 3 / 6])
