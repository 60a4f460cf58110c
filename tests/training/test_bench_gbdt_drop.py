"""bench/bench_gbdt_drop.py: every feature is left out of exactly one refit (train, valid and test alike), and
the printed changes are the refits' test figures minus the full fit's."""
import pytest

from bench import bench_gbdt_drop
from twinv2.config import load_params
from twinv2.models import gbdt


def test_each_refit_leaves_out_one_feature_and_differences_add_up(planted_ro, monkeypatch):
    widths, real_fit = [], gbdt.fit

    def spy(X, y, X_val, y_val, params, seed=0):
        assert X_val.shape[1] == X.shape[1]
        widths.append(X.shape[1])
        return real_fit(X, y, X_val, y_val, params, seed=seed)

    monkeypatch.setattr(gbdt, "fit", spy)
    res = bench_gbdt_drop.drop_columns(str(planted_ro), load_params())
    names = [r["feature"] for r in res["drop"]]
    assert names == list(gbdt.feature_names(bool(load_params()["gbdt"]["user_feedback"])))
    assert widths == [len(names)] + [len(names) - 1] * len(names)
    assert 0.5 < res["auc"] <= 1.0 and res["n_test"] > 0
    for r in res["drop"]:
        assert r["d_auc"] == pytest.approx(r["auc"] - res["auc"])
        assert r["d_gauc"] == pytest.approx(r["gauc"] - res["gauc"])
