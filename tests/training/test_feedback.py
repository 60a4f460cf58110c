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
    assert fb.prior == (pytest.approx(tr["label"].mean()) if len(tr) else 0.5)
    f = fb.head_features(users, ts)
    np.testing.assert_allclose(f[:, 0], np.log1p(wn), rtol=1e-6)
    np.testing.assert_allclose(f[:, 1], (wk + fb.prior) / (wn + 1), rtol=1e-6)


def test_a_sample_never_counts_its_own_or_a_later_or_an_evaluation_label():
    imp = pd.DataFrame({"user_id": [1, 1, 1, 1, 2], "ts": [10, 20, 20, 30, 5], "label": [1, 1, 0, 1, 1],
                        "split": ["train", "train", "train", "test", "train"]})
    fb = Feedback.from_impressions(imp)
    n, k = fb.counts(np.array([1, 1, 1, 1, 3]), np.array([10, 20, 21, 99, 99]))
    assert n.tolist() == [0, 1, 3, 3, 0]          # ts 10 counts nothing (its own), ts 20 only ts 10, the test row never
    assert k.tolist() == [0.0, 1.0, 2.0, 2.0, 0.0]
