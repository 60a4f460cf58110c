"""The synthetic life-cycle world: layout, determinism, statistics against their targets, the
leakage rule, time windows, interest kinds, and the dormant-interest knob."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from twinv2.data import catalogue as C
from twinv2.data.schema import BEHAVIORS_SCHEMA, IMPRESSIONS_SCHEMA, ITEMS_SCHEMA
from twinv2.data.store import UserHistories, behavior_files, read_table
from twinv2.data.synthetic import DAY_MS, DORMANT, SHORT, World, make_config, sample_lengths

REPORT_KEYS = {"n_users", "n_items", "n_behaviors", "n_impressions", "history_p50", "history_p90",
               "history_max", "oracle_auc", "oracle_auc_overall", "summary"}


def _rank_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Plain Mann-Whitney AUC (average ranks for ties), independent of the report's sklearn call."""
    order = np.argsort(p, kind="stable")
    ranks = np.empty(len(p))
    sp = p[order]
    i = 0
    while i < len(sp):                       # average ranks over tied scores
        j = i
        while j + 1 < len(sp) and sp[j + 1] == sp[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n1 = y.sum()
    n0 = len(y) - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _report(world: Path) -> dict:
    return json.loads((world / "reports" / "generate.json").read_text())


# ---------------------------------------------------------------- layout and schema


def test_tiny_world_layout_schema_and_report(tiny_world_ro):
    raw = tiny_world_ro / "raw"
    items = pq.read_table(raw / "items.parquet")
    assert items.schema.equals(ITEMS_SCHEMA)
    imps = pq.read_table(raw / "impressions.parquet")
    assert imps.schema.equals(IMPRESSIONS_SCHEMA)
    beh = read_table(raw / "behaviors", "behaviors")
    for f in BEHAVIORS_SCHEMA:
        assert beh.schema.field(f.name).type == f.type, f.name
    assert str(beh.schema.field("liked").type) == "int8"
    assert str(beh.schema.field("true_interest").type) == "int32"
    meta = json.loads((raw / "meta.json").read_text())
    assert meta["source"] == "synthetic:tiny"
    assert meta["history_start_ms"] < meta["history_end_ms"] < meta["end_ms"]

    rep = _report(tiny_world_ro)
    assert REPORT_KEYS <= set(rep)
    assert rep["n_behaviors"] == len(beh) and rep["n_impressions"] == len(imps) and rep["n_items"] == len(items)
    assert rep["n_behaviors_history"] + rep["n_behaviors_impression_window"] == rep["n_behaviors"]
    assert sum(rep["impressions_by_split"].values()) == rep["n_impressions"]
    lengths = np.bincount(beh.column("user_id").to_numpy())[1:]
    assert len(lengths) == rep["n_users"] == 50
    assert rep["history_p50"] == pytest.approx(float(np.median(lengths)))
    assert rep["history_max"] == lengths.max()
    # every behaviour's item exists in the catalogue, with its duration
    item_dur = dict(zip(items.column("item_id").to_pylist(), items.column("duration_ms").to_pylist()))
    bi, bd = beh.column("item_id").to_numpy(), beh.column("duration_ms").to_numpy()
    assert np.array_equal(np.array([item_dur[i] for i in bi[:2000]]), bd[:2000])
    assert set(np.unique(bi)) <= set(item_dur)


def test_oracle_auc_recomputed_from_the_files(tiny_world_ro):
    imps = pq.read_table(tiny_world_ro / "raw" / "impressions.parquet").to_pandas()
    rep = _report(tiny_world_ro)
    test = imps[imps.split == "test"]
    auc_test = _rank_auc(test.label.to_numpy(), test.p_true.to_numpy())
    auc_all = _rank_auc(imps.label.to_numpy(), imps.p_true.to_numpy())
    assert rep["oracle_auc"] == pytest.approx(auc_test, abs=1e-9)
    assert rep["oracle_auc_overall"] == pytest.approx(auc_all, abs=1e-9)
    assert 0.72 <= auc_all <= 0.85          # tiny: few impressions, a looser band than default's
    assert 0.1 < imps.label.mean() < 0.5
    # labels really are Bernoulli(p_true): the mean label follows the mean p_true
    assert abs(imps.label.mean() - imps.p_true.mean()) < 0.03


# ---------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_world(tmp_path, params):
    from pipelines import generate

    a = generate.run("tiny", tmp_path / "a", seed=3, params=params)
    b = generate.run("tiny", tmp_path / "b", seed=3, params=params)
    ha, hb = _hash_tree(tmp_path / "a" / "raw"), _hash_tree(tmp_path / "b" / "raw")
    assert ha == hb and len(ha) >= 4
    volatile = {"seconds", "rows_per_s", "summary"}
    assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
    generate.run("tiny", tmp_path / "c", seed=4, params=params)
    hc = _hash_tree(tmp_path / "c" / "raw")
    assert hc["impressions.parquet"] != ha["impressions.parquet"]
    assert [v for k, v in hc.items() if k.startswith("behaviors")] != [v for k, v in ha.items() if k.startswith("behaviors")]


def test_rerun_replaces_raw_whole_and_progress_goes_to_stderr(tmp_path, params, capsys):
    from pipelines import generate

    generate.run("tiny", tmp_path / "w", seed=1, params=params)
    stray = tmp_path / "w" / "raw" / "stray.txt"
    stray.write_text("left from an older run")
    rep = generate.run("tiny", tmp_path / "w", seed=1, params=params)
    assert not stray.exists()
    assert not [p for p in (tmp_path / "w").iterdir() if p.name.startswith(".")]   # no temp leftovers
    err = capsys.readouterr().err
    assert "generate tiny" in err and "50/50" in err
    assert rep["summary"].startswith("generated synthetic:tiny")


# ---------------------------------------------------------------- ordering, time windows, leakage


def test_sorted_by_user_ts_and_time_windows(tiny_world_ro):
    raw = tiny_world_ro / "raw"
    meta = json.loads((raw / "meta.json").read_text())
    seen_users: set[int] = set()
    prev = (-1, -1)
    for f in behavior_files(raw / "behaviors"):
        t = pq.read_table(f, columns=["user_id", "ts"])
        u, ts = t.column("user_id").to_numpy(), t.column("ts").to_numpy()
        key_ok = (np.diff(u) > 0) | ((np.diff(u) == 0) & (np.diff(ts) >= 0))
        assert key_ok.all() and (u[0], ts[0]) >= prev
        prev = (u[-1], ts[-1])
        users = set(np.unique(u).tolist())
        assert not (users & seen_users), "a user is split across part files"
        seen_users |= users
        assert ts.min() >= meta["history_start_ms"] and ts.max() < meta["end_ms"]
    imps = pq.read_table(raw / "impressions.parquet").to_pandas()
    assert (imps.ts >= meta["history_end_ms"]).all() and (imps.ts < meta["end_ms"]).all()
    assert (imps.loc[imps.split == "train", "ts"] < meta["valid_start_ms"]).all()
    v = imps[imps.split == "valid"].ts
    assert ((v >= meta["valid_start_ms"]) & (v < meta["test_start_ms"])).all()
    assert (imps.loc[imps.split == "test", "ts"] >= meta["test_start_ms"]).all()
    assert set(imps.split) == {"train", "valid", "test"}
    # users keep watching during the impression window (incremental clustering consumes these)
    assert _report(tiny_world_ro)["n_behaviors_impression_window"] > 0
    # every user has impressions in the test split (GAUC needs them)
    assert imps[imps.split == "test"].user_id.nunique() >= 45


def test_leakage_rule_on_generated_world(tiny_world_ro):
    raw = tiny_world_ro / "raw"
    hist = UserHistories.load(raw / "behaviors", columns=["item_id", "ts", "play_ms"])
    imps = pq.read_table(raw / "impressions.parquet").to_pandas()
    uidx, pos = hist.positions(imps.user_id.to_numpy(), imps.ts.to_numpy())
    assert (uidx >= 0).all()
    rng = np.random.default_rng(0)
    for k in rng.choice(len(imps), size=300, replace=False):
        h = hist.history(int(uidx[k]), int(pos[k]))
        u_all = hist.history(int(uidx[k]), int(hist.lengths()[uidx[k]]))["ts"]
        t = imps.ts.iat[k]
        assert (h["ts"] < t).all()
        assert len(h["ts"]) == int((u_all < t).sum())        # plain reference: count before t
    # samples late in the impression window see behaviours from the impression window itself
    meta = json.loads((raw / "meta.json").read_text())
    last = [hist.history(int(uidx[k]), int(pos[k]))["ts"][-1] for k in range(len(imps)) if pos[k] > 0][-50:]
    assert max(last) >= meta["history_end_ms"]


# ---------------------------------------------------------------- statistics against targets


def test_tiny_statistics_against_targets(tiny_world_ro):
    rep = _report(tiny_world_ro)
    cfg = make_config("tiny")
    assert abs(rep["history_p50"] / cfg.length_median - 1) < 0.15
    assert abs(rep["history_p90"] / cfg.length_p90 - 1) < 0.2
    assert rep["history_max"] == cfg.length_max
    lengths = sample_lengths(cfg, 0)
    assert (lengths >= 1_500).sum() >= 3                        # a few users with thousands of behaviours
    assert 0.5 <= rep["completion_mean"] <= 0.85
    assert 0.01 <= rep["replay_share"] <= 0.15
    assert 0.005 <= rep["liked_rate"] <= 0.1
    assert 0.1 <= rep["explore_share"] <= 0.2
    assert min(rep["interests_by_kind"].values()) > 0
    per_user = rep["n_impressions"] / rep["n_users"]
    assert cfg.impressions_min <= per_user <= cfg.impressions_max


@pytest.mark.parametrize("preset,seed", [("large", 0), ("large", 7), ("default", 7), ("default", 1)])
def test_length_distribution_matches_kuairand_targets(preset, seed):
    cfg = make_config(preset)
    x = sample_lengths(cfg, seed)
    assert len(x) == cfg.n_users
    assert abs(np.median(x) / cfg.length_median - 1) < 0.10
    assert abs(np.quantile(x, 0.9) / cfg.length_p90 - 1) < 0.10
    assert abs(x.max() / cfg.length_max - 1) < 0.10
    if preset == "large":   # KuaiRand-27K's own numbers
        assert abs(np.median(x) / 8_594 - 1) < 0.1 and abs(np.quantile(x, 0.9) / 24_587 - 1) < 0.1
        assert abs(x.max() / 228_000 - 1) < 0.1


def test_default_world_statistics_and_oracle_auc(tmp_path, params):
    """The scaled check: the world `make run` uses, generated for real (a few seconds)."""
    from pipelines import generate

    rep = generate.run("default", tmp_path / "d", seed=7, params=params)
    cfg = make_config("default")
    assert rep["n_users"] == 300 and rep["n_items"] == cfg.n_items
    assert abs(rep["history_p50"] / 1_700 - 1) < 0.10
    assert abs(rep["history_p90"] / 4_900 - 1) < 0.10
    assert abs(rep["history_max"] / 45_000 - 1) < 0.10
    assert 0.75 <= rep["oracle_auc"] <= 0.82
    assert 0.75 <= rep["oracle_auc_overall"] <= 0.82
    # dormant interests matter: without them the same truth ranks clearly worse
    assert rep["oracle_auc"] - rep["oracle_auc_without_dormant"] > 0.02
    assert rep["n_categories"] >= 40
    assert 100 <= rep["n_impressions"] / rep["n_users"] <= 200


# ---------------------------------------------------------------- the catalogue's calibration


def test_catalogue_calibrated_to_kuairand_pure():
    cat = C.make_catalogue(20_000, seed=0)
    q = [0.1, 0.25, 0.5, 0.75, 0.9]
    real = np.exp(np.interp(q, C.DURATION_Q, np.log(C.DURATION_MS)))
    assert np.allclose(np.quantile(cat.duration_ms, q), real, rtol=0.06)
    per_author = np.bincount(cat.author_id)[1:]
    share1 = C.ITEMS_PER_AUTHOR_COUNTS[1] / sum(C.ITEMS_PER_AUTHOR_COUNTS.values())
    assert abs((per_author == 1).mean() - share1) < 0.02
    shares = np.bincount(cat.category, minlength=C.N_CATEGORIES + 1)[1:] / len(cat)
    real_sh = np.asarray(C.PRIMARY_TAG_COUNTS) / sum(C.PRIMARY_TAG_COUNTS)
    assert np.abs(shares - real_sh).max() < 0.02 and np.corrcoef(shares, real_sh)[0, 1] > 0.98
    assert abs((cat.category2 > 0).mean() - C.P_SECONDARY_TAG) < 0.03
    n_cats = len(set(np.unique(cat.category)) | set(np.unique(cat.category2[cat.category2 > 0])))
    assert n_cats == C.N_CATEGORIES == 46
    # Zipf-like long tail: the top 1% of items carry a large share of the popularity
    top = np.sort(cat.popularity)[::-1]
    assert top[:200].sum() > 0.4 and top[-10_000:].sum() < 0.1
    # deterministic for a seed
    again = C.make_catalogue(20_000, seed=0)
    assert np.array_equal(again.emb, cat.emb) and np.array_equal(again.author_id, cat.author_id)


# ---------------------------------------------------------------- interests, completion, labels


def _users(preset: str = "tiny", seed: int = 0, **knobs):
    w = World(make_config(preset, knobs), seed)
    return w, list(w.users())


def test_interest_kinds_follow_their_schedules():
    w, users = _users()
    cfg = w.cfg
    quiet_from = cfg.history_end_ms - cfg.dormant_quiet_days * DAY_MS
    n_dormant_gaps = 0
    for beh, _, st in users:
        kind, ti, ts = st["interest_kind"], beh["true_interest"], beh["ts"]
        for j in np.flatnonzero(kind == DORMANT):
            t = ts[ti == j]
            assert (t < quiet_from).all(), "a dormant interest was active in its quiet window"
            if len(t) > 1 and np.diff(t).max() >= cfg.dormant_gap_days[0] * DAY_MS:
                n_dormant_gaps += 1
        for j in np.flatnonzero(kind == SHORT):
            t = ts[ti == j]
            if len(t):
                assert t.max() - t.min() <= (cfg.short_episode_days[1] + 1) * DAY_MS
    assert n_dormant_gaps >= 20          # dormant interests come back after months-long gaps


def test_completion_depends_on_interest_match():
    _, users = _users()
    ratio = np.concatenate([b["play_ms"] / b["duration_ms"] for b, _, _ in users])
    ti = np.concatenate([b["true_interest"] for b, _, _ in users])
    assert np.median(ratio[ti >= 0]) > np.median(ratio[ti < 0]) + 0.15
    assert (ratio > 1).mean() > 0.01 and ratio.max() <= 4.0 + 1e-3   # replays, capped below validate's 5x
    liked = np.concatenate([b["liked"] for b, _, _ in users])
    assert liked[ti >= 0].mean() > liked[ti < 0].mean()


def test_dormant_weight_knob_controls_how_much_dormant_interests_matter():
    from sklearn.metrics import roc_auc_score

    def gap(**knobs):
        _, users = _users(**knobs)
        y = np.concatenate([i["label"] for _, i, _ in users])
        p = np.concatenate([i["p_true"] for _, i, _ in users])
        pr = np.concatenate([s["p_recent"] for _, _, s in users])
        return roc_auc_score(y, p) - roc_auc_score(y, pr), np.abs(p - pr).max()

    g0, d0 = gap(dormant_weight=0.0)
    g1, _ = gap()
    g3, _ = gap(dormant_weight=3.0)
    assert d0 == 0.0 and g0 == 0.0            # no dormant weight: the recent view is the whole truth
    assert g1 > 0.02 and g3 > g1 + 0.05


def test_bad_preset_and_knob_are_named():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_config("huge")
    with pytest.raises(ValueError, match="dormant_wieght"):
        make_config("tiny", {"dormant_wieght": 2})
    with pytest.raises(ValueError, match="length_median"):
        make_config("tiny", {"length_median": 5_000})


def test_logit_parts_add_up_to_p_true():
    """The parts bench_oracle_gap reads are the logit of p_true term by term (label_bias + the parts), and the
    recent-only parts give p_recent: a regrouping of the same draws, not a second generator."""
    w, users = _users()
    cfg = w.cfg
    for _, imp, st in users:
        parts = st["parts"]
        logit = cfg.label_bias + sum(parts[k] for k in ("interest", "pop", "quality", "user_bias", "noise"))
        np.testing.assert_allclose(1 / (1 + np.exp(-logit)), imp["p_true"], rtol=1e-5, atol=1e-6)
        recent = logit - parts["interest"] + parts["interest_recent"]
        np.testing.assert_allclose(1 / (1 + np.exp(-recent)), st["p_recent"], rtol=1e-5, atol=1e-6)
        assert (parts["interest_recent"] <= parts["interest"] + 1e-12).all()
        assert np.all((parts["top_kind"] == -1) == (parts["interest"] == 0))
        assert np.unique(parts["user_bias"]).size == 1
