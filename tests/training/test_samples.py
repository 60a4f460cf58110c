"""Samples: leakage, clusters as of the watermark, short part, padding, against a per-sample reference."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from twinv2.data.store import BehaviorWriter, UserHistories
from twinv2.training.samples import (SampleSet, Vocab, cluster_features, extra_cross_columns, loader,
                                     make_samples, raw_features)

DAY = 86_400_000


def small_store(tmp_path, seed=0, n_users=6, max_len=40):
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": np.arange(100, 160), "author_id": rng.integers(0, 7, 60) * 10,
                          "category": rng.integers(0, 5, 60), "duration_ms": rng.integers(5_000, 200_000, 60)})
    rows = []
    for u in range(n_users):
        n = int(rng.integers(0, max_len)) if u else 0           # user 0 has no history
        ts = np.sort(rng.choice(np.arange(0, 100 * DAY, 3_600_000), n, replace=False))
        it = rng.integers(100, 161, n)                          # 160 is unknown to the items table
        dur = items.set_index("item_id").reindex(it)["duration_ms"].fillna(30_000).to_numpy()
        rows.append(pd.DataFrame({"user_id": u, "item_id": it, "ts": ts,
                                  "play_ms": (dur * rng.uniform(0, 2, n)).astype(int), "duration_ms": dur.astype(int),
                                  "liked": rng.integers(0, 2, n)}))
    beh = pd.concat(rows, ignore_index=True)
    with BehaviorWriter(tmp_path / "behaviors") as w:
        w.write(beh)
    hist = UserHistories.load(tmp_path / "behaviors")
    imp = pd.DataFrame({"user_id": rng.integers(0, n_users + 1, 50), "item_id": rng.integers(100, 160, 50),
                        "ts": rng.integers(20 * DAY, 110 * DAY, 50), "label": rng.integers(0, 2, 50)})
    return items, beh, hist, imp


def reference_seq(vocab, beh, user, ts, width):
    """Plain reference: filter the user's behaviours with ts < sample ts, keep the last `width`."""
    h = beh[(beh.user_id == user) & (beh.ts < ts)].sort_values("ts").tail(width)
    out = np.zeros((width, 4 + 2 + 1 + 1), dtype=np.int64)   # item author category dur | comp play gap liked
    mask = np.zeros(width, bool)
    for k, r in enumerate(h.itertuples()):
        ii = vocab.item_index(np.array([r.item_id]))[0]
        comp = int(np.digitize(r.play_ms / max(r.duration_ms, 1), vocab.features["completion_edges"])) + 1
        play = int(np.digitize(r.play_ms / 1000, vocab.features["play_edges_s"])) + 1
        gap = min(int(math.floor(math.log2(1 + (ts - r.ts) / 1000))), 30) + 1
        liked = int(np.digitize(r.liked, vocab.extra_edges["liked"])) + 1
        dur = int(np.digitize(r.duration_ms / 1000, vocab.features["dur_edges_s"])) + 1
        out[k] = [ii, vocab.item_author[ii], vocab.item_category[ii], dur, comp, play, gap, liked]
        mask[k] = True
    return out, mask, h


def as_rows(part):
    return np.concatenate([torch.stack([part[k] for k in ("item", "author", "category", "dur_bucket")], -1).numpy(),
                           part["cross"].numpy()], -1)


def test_raw_batches_match_reference_and_never_leak(tmp_path):
    items, beh, hist, imp = small_store(tmp_path)
    assert extra_cross_columns(beh.columns) == ["liked"]
    vocab = Vocab.build(items, {"liked": beh["liked"].to_numpy()})
    assert vocab.sizes()["cross"][3] == 11 and len(vocab.sizes()["cross"]) == 4
    samples = make_samples(imp, hist, vocab)
    ds = SampleSet(samples, raw_features(hist, vocab), vocab, "raw", long_len=12, short_len=5)
    b = ds[list(range(len(imp)))]
    assert b["long"]["item"].shape == (50, 12) and b["long"]["cross"].shape == (50, 12, 4)
    assert b["short"]["item"].shape == (50, 5) and b["long"]["item"].dtype == torch.int64
    for i, r in enumerate(imp.itertuples()):
        for part, width in (("long", 12), ("short", 5)):
            ref, mask, h = reference_seq(vocab, beh, r.user_id, r.ts, width)
            got = as_rows(b[part])[i]
            assert (b[part]["mask"][i].numpy() == mask).all()
            np.testing.assert_array_equal(got, ref)           # padding at the end is all zeros
            assert (h.ts < r.ts).all()                         # leakage rule of the reference itself
        assert b["target"]["item"][i] == vocab.item_index(np.array([r.item_id]))[0]
    assert (b["long"]["log_n"] == 0).all()
    # the short part is the tail of the long part when both fit
    n_long = b["long"]["mask"].sum(1)
    for i in range(50):
        k = int(min(n_long[i], 5))
        assert (b["short"]["item"][i, :k] == b["long"]["item"][i, n_long[i] - k:n_long[i]]).all()


def test_no_behaviour_at_or_after_sample_ts(tmp_path):
    items, beh, hist, imp = small_store(tmp_path, seed=3)
    # samples exactly at a behaviour's ts: that behaviour must not be in the history
    u = int(beh.user_id.value_counts().idxmax())
    b0 = beh[beh.user_id == u].iloc[5]
    imp = pd.DataFrame({"user_id": [u], "item_id": [101], "ts": [b0.ts], "label": [1]})
    vocab = Vocab.build(items, {"liked": beh["liked"].to_numpy()})
    ds = SampleSet(make_samples(imp, hist, vocab), raw_features(hist, vocab), vocab, "raw", None, 3)
    b = ds[[0]]
    assert int(b["long"]["mask"].sum()) == 5                   # exactly the 5 behaviours strictly before
    assert b["long"]["item"].shape[1] == 5                     # long_len None: whole history, dynamic width


def clusters_for(beh, watermark, vocab_items):
    rows = []
    for u, g in beh[beh.ts < watermark].groupby("user_id"):
        for cid, ix in enumerate(np.array_split(np.arange(len(g)), max(1, len(g) // 4))):
            part = g.iloc[ix]
            if len(part) == 0:
                continue
            rep = part.iloc[0]
            rows.append({"user_id": u, "cluster_id": cid, "group": 0, "size": len(part), "item_id": rep.item_id,
                         "author_id": int(vocab_items.set_index("item_id").author_id.get(rep.item_id, -1)),
                         "category": int(vocab_items.set_index("item_id").category.get(rep.item_id, -1)),
                         "duration_ms": part.duration_ms.mean(), "play_ms": part.play_ms.mean(),
                         "completion": (part.play_ms / part.duration_ms).mean(), "ts": part.ts.mean(),
                         "liked": part.liked.mean()})
    return pd.DataFrame(rows)


def test_clusters_as_of_watermark(tmp_path):
    items, beh, hist, imp = small_store(tmp_path, seed=1, max_len=60)
    W = 50 * DAY
    cl = clusters_for(beh, W, items)
    vocab = Vocab.build(items, {"liked": beh["liked"].to_numpy()})
    cf = cluster_features(cl, vocab)
    with pytest.raises(ValueError, match="watermark"):
        make_samples(imp, hist, vocab, cf, watermark=W)       # some impressions are before W
    imp = imp[imp.ts >= W].reset_index(drop=True)
    s = make_samples(imp, hist, vocab, cf, watermark=W)
    ds = SampleSet(s, raw_features(hist, vocab), vocab, "clusters", long_len=3, short_len=4, clusters=cf)
    b = ds[list(range(len(imp)))]
    for i, r in enumerate(imp.itertuples()):
        mine = cl[cl.user_id == r.user_id].sort_values("ts").tail(3)
        m = b["long"]["mask"][i].numpy()
        assert m.sum() == len(mine)
        assert (mine.ts < W).all()
        np.testing.assert_allclose(b["long"]["log_n"][i].numpy()[m], np.log(mine["size"].to_numpy()), rtol=1e-6)
        np.testing.assert_array_equal(b["long"]["item"][i].numpy()[m], vocab.item_index(mine.item_id.to_numpy()))
        assert (b["long"]["log_n"][i].numpy()[~m] == 0).all()
        # cross: averaged completion bucket, gap from the mean ts
        comp = np.digitize(mine.completion, vocab.features["completion_edges"]) + 1
        np.testing.assert_array_equal(b["long"]["cross"][i, m, 0].numpy(), comp)
        gap = np.minimum(np.floor(np.log2(1 + (r.ts - mine.ts.to_numpy()) / 1000)), 30) + 1
        np.testing.assert_array_equal(b["long"]["cross"][i, m, 2].numpy(), gap)
        ref, mask, _ = reference_seq(vocab, beh, r.user_id, r.ts, 4)     # short part stays raw, up to ts
        np.testing.assert_array_equal(as_rows(b["short"])[i], ref)


def test_loader_workers_same_batches_and_deterministic_order(tmp_path):
    items, beh, hist, imp = small_store(tmp_path, seed=2)
    vocab = Vocab.build(items, {"liked": beh["liked"].to_numpy()})
    ds = SampleSet(make_samples(imp, hist, vocab), raw_features(hist, vocab), vocab, "raw", 8, 4)
    a = list(loader(ds, 16, shuffle=True, seed=5, num_workers=0))
    b = list(loader(ds, 16, shuffle=True, seed=5, num_workers=2))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert torch.equal(x["long"]["item"], y["long"]["item"]) and torch.equal(x["label"], y["label"])
    users = torch.cat([x["user"] for x in a])
    assert sorted(users.tolist()) == sorted(imp.user_id.tolist())      # every sample once per epoch
    # ranks of a 2-process run split the batches without overlap
    r0 = list(loader(ds, 16, True, 5, rank=0, world=2).sampler)
    r1 = list(loader(ds, 16, True, 5, rank=1, world=2).sampler)
    assert len(r0) == len(r1) == 2 and not set(sum(r0, [])) & set(sum(r1, []))


def test_vocab_roundtrip(tmp_path):
    items, beh, hist, imp = small_store(tmp_path)
    v = Vocab.build(items, {"liked": beh["liked"].to_numpy()})
    v.save(tmp_path / "vocab.npz")
    w = Vocab.load(tmp_path / "vocab.npz")
    assert w.sizes() == v.sizes()
    np.testing.assert_array_equal(w.item_author, v.item_author)
    assert v.item_index(np.array([160, 100]))[0] == len(v.item_ids) + 1
    with pytest.raises(ValueError, match="lacks columns"):
        Vocab.build(items.drop(columns="category"))


def _clusters_then_gap(vocab, mine, beh, r, W, long_len):
    """Reference long part: the user's cluster rows `mine` (in the order given), then the raw behaviours in
    [W, r.ts) as clusters of size 1, the last long_len of the two -> (item indices, ln n)."""
    gap = beh[(beh.user_id == r.user_id) & (beh.ts >= W) & (beh.ts < r.ts)]
    want_item = np.concatenate([vocab.item_index(mine.item_id.to_numpy()), vocab.item_index(gap.item_id.to_numpy())])
    want_n = np.concatenate([np.log(mine["size"].to_numpy()), np.zeros(len(gap))])
    if long_len is not None:
        want_item, want_n = want_item[-long_len:], want_n[-long_len:]
    return want_item, want_n


@pytest.mark.parametrize("long_len", [3, 8, None])
def test_watermark_gap_rows_follow_the_clusters_and_never_reach_ts(tmp_path, long_len):
    """watermark_gap: long = the user's clusters (behaviours < W), then the raw behaviours in [W, ts) as
    clusters of size 1, the last long_len of the two together; never a behaviour at or after ts."""
    items, beh, hist, imp = small_store(tmp_path, seed=2, max_len=60)
    W = 50 * DAY
    cl = clusters_for(beh, W, items)
    vocab = Vocab.build(items, {"liked": beh["liked"].to_numpy()})
    cf = cluster_features(cl, vocab)
    imp = imp[imp.ts >= W].reset_index(drop=True)
    s = make_samples(imp, hist, vocab, cf, watermark=W)
    raw = raw_features(hist, vocab)
    ds = SampleSet(s, raw, vocab, "clusters", long_len=long_len, short_len=4, clusters=cf, watermark=W,
                   watermark_gap=True)
    b = ds[list(range(len(imp)))]
    assert len(imp) > 5
    for i, r in enumerate(imp.itertuples()):
        mine = cl[cl.user_id == r.user_id].sort_values("ts", kind="stable")
        want_item, want_n = _clusters_then_gap(vocab, mine, beh, r, W, long_len)
        m = b["long"]["mask"][i].numpy()
        assert m.sum() == len(want_item) and m[:m.sum()].all()               # left-aligned
        np.testing.assert_array_equal(b["long"]["item"][i].numpy()[m], want_item)
        np.testing.assert_allclose(b["long"]["log_n"][i].numpy()[m], want_n, rtol=1e-6)
        assert (b["long"]["item"][i].numpy()[~m] == 0).all()
    # without the flag the same samples read the clusters only
    plain = SampleSet(s, raw, vocab, "clusters", long_len=long_len, short_len=4, clusters=cf, watermark=W)[
        list(range(len(imp)))]
    assert int(plain["long"]["mask"].sum()) < int(b["long"]["mask"].sum())


def members_for(beh, watermark):
    """The behaviour -> cluster map of clusters_for (same split), in the order of the behaviours."""
    rows = []
    for u, g in beh[beh.ts < watermark].groupby("user_id"):
        for cid, ix in enumerate(np.array_split(np.arange(len(g)), max(1, len(g) // 4))):
            part = g.iloc[ix]
            rows.append(pd.DataFrame({"user_id": u, "ts": part.ts, "item_id": part.item_id, "cluster_id": cid}))
    return pd.concat(rows).sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize("shuffle", [False, True])
def test_cluster_mix_equals_a_per_cluster_count(tmp_path, shuffle):
    """Each cluster row's J most frequent member ids (count desc, index asc), their counts and completion sums,
    == a plain per-cluster Counter; members in the stored order or shuffled (the join by key)."""
    from collections import defaultdict

    from twinv2.training.samples import MIX_FIELDS, cluster_mix

    items, beh, hist, _ = small_store(tmp_path, seed=5, max_len=60)
    W = 60 * DAY
    cl, mem = clusters_for(beh, W, items), members_for(beh, W)
    if shuffle:
        mem = mem.sample(frac=1.0, random_state=0).reset_index(drop=True)
    vocab = Vocab.build(items, {"liked": beh["liked"].to_numpy()})
    cf, raw = cluster_features(cl, vocab), raw_features(hist, vocab)
    J = 2
    mix = cluster_mix(cf, mem, raw, vocab, J, W)
    urow = np.repeat(cf.user_ids, np.diff(cf.offsets))
    b = beh[beh.ts < W].merge(mem, on=["user_id", "ts", "item_id"])
    assert len(b) == len(mem)
    for r in range(len(cf.item)):
        g = b[(b.user_id == urow[r]) & (b.cluster_id == cf.cluster_id[r])]
        ii = vocab.item_index(g.item_id.to_numpy())
        ids = {"item": ii, "author": vocab.item_author[ii], "category": vocab.item_category[ii]}
        comp = (g.play_ms / np.maximum(g.duration_ms, 1)).to_numpy()
        for f in MIX_FIELDS:
            n, c = defaultdict(int), defaultdict(float)
            for k, x in zip(ids[f], comp):
                n[int(k)] += 1
                c[int(k)] += float(x)
            top = sorted(n, key=lambda k: (-n[k], k))[:J]
            want_i = np.array(top + [0] * (J - len(top)))
            np.testing.assert_array_equal(mix[f][0][r], want_i)
            np.testing.assert_array_equal(mix[f][1][r], [n[k] for k in top] + [0] * (J - len(top)))
            np.testing.assert_allclose(mix[f][2][r], [c[k] for k in top] + [0] * (J - len(top)), rtol=1e-5)


@pytest.mark.parametrize("J,gap", [(1, True), (2, False), (None, True)])
def test_life_counts_equal_a_loop_over_every_cluster_and_the_gap_rows(tmp_path, J, gap):
    """virtual_mix: batch["life"] = match counts over ALL the user's clusters (their id mixes) plus the raw rows
    in [W, ts), whatever the long window; with J >= the largest cluster that is every behaviour before ts."""
    from twinv2.models.base import match_counts
    from twinv2.training.samples import MIX_FIELDS, cluster_mix

    items, beh, hist, imp = small_store(tmp_path, seed=6, max_len=60)
    W = 50 * DAY
    cl, mem = clusters_for(beh, W, items), members_for(beh, W)
    vocab = Vocab.build(items, {"liked": beh["liked"].to_numpy()})
    cf, raw = cluster_features(cl, vocab), raw_features(hist, vocab)
    J = int(cl["size"].max()) if J is None else J
    cf.mix = cluster_mix(cf, mem, raw, vocab, J, W)
    imp = imp[imp.ts >= W].reset_index(drop=True)
    ds = SampleSet(make_samples(imp, hist, vocab, cf, watermark=W), raw, vocab, "clusters", long_len=2,
                   short_len=4, clusters=cf, watermark=W, watermark_gap=gap, mix_slots=J)
    b = ds[list(range(len(imp)))]
    got = b["life"].numpy()
    assert got.shape == (len(imp), 4 * 3 + 2) and len(imp) > 5
    urow = np.repeat(cf.user_ids, np.diff(cf.offsets))
    comp = (beh.play_ms / np.maximum(beh.duration_ms, 1)).astype(np.float32).to_numpy()
    for i, r in enumerate(imp.itertuples()):
        t = int(vocab.item_index(np.array([r.item_id]))[0])
        q = {"item": t, "author": vocab.item_author[t], "category": vocab.item_category[t]}
        rows = np.flatnonzero(urow == r.user_id)
        g = (beh.user_id == r.user_id) & (beh.ts >= W) & (beh.ts < r.ts) if gap else np.zeros(len(beh), bool)
        gi = vocab.item_index(beh.item_id[g].to_numpy())
        gids = {"item": gi, "author": vocab.item_author[gi], "category": vocab.item_category[gi]}
        N = float(np.exp(cf.log_n[rows].astype(np.float64)).sum()) + g.sum()
        P = float((np.exp(cf.log_n[rows].astype(np.float64)) * cf.comp[rows]).sum()) + comp[g].sum()
        C, D = [], []
        for f in MIX_FIELDS:
            ids, n, c = cf.mix[f]
            C.append(sum(float(n[k, j]) for k in rows for j in range(J) if ids[k, j] == q[f] and n[k, j] > 0)
                     + float((gids[f] == q[f]).sum()))
            D.append(sum(float(c[k, j]) for k in rows for j in range(J) if ids[k, j] == q[f] and n[k, j] > 0)
                     + float(comp[g][gids[f] == q[f]].sum()))
        C, D = np.array(C), np.array(D)
        want = np.concatenate([np.log1p(C), C / max(N, 1e-6), np.log1p(D), D / max(P, 1e-6),
                               [np.log1p(N), P / max(N, 1.0)]])
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-5)
        if J >= int(cl["size"].max()) and gap:      # exact: every behaviour before ts, none at or after it
            h = beh[(beh.user_id == r.user_id) & (beh.ts < r.ts)]
            hi = vocab.item_index(h.item_id.to_numpy())
            exact = [np.sum(vocab.item_category[hi] == q["category"]), np.sum(vocab.item_author[hi] == q["author"]),
                     np.sum(hi == t)]
            np.testing.assert_allclose(got[i, :3], np.log1p(exact), rtol=1e-5)
            np.testing.assert_allclose(got[i, -2], np.log1p(len(h)), rtol=1e-5)
    # the one-(user, ts) path (serving; a group of the batch path) equals the per-sample one: every impression's
    # target scored at sample i's user and ts, at once and one by one (B = 1 takes the general path)
    every = np.arange(len(imp))
    ti = ds.samples.item
    tg = {"item": ti, "author": vocab.item_author[ti], "category": vocab.item_category[ti]}
    glo, ghi = ds.gap_bounds(every)
    for i in range(min(len(imp), 6)):
        rep = np.full(len(imp), i)
        one = ds.life.features(ds.samples.cidx[rep], tg, ds.raw, glo[rep], ghi[rep])
        each = np.concatenate([ds.life.features(ds.samples.cidx[i:i + 1], {k: v[j:j + 1] for k, v in tg.items()},
                                                ds.raw, glo[i:i + 1], ghi[i:i + 1]) for j in every])
        np.testing.assert_allclose(one, each, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("long_len", [2, 5, None])
def test_cluster_order_size_keeps_the_largest_clusters_then_the_gap_rows(tmp_path, long_len):
    """model.cluster_order size (RowFeatures.by_size): a user's clusters ordered by size ascending (ties: older
    first), then the raw rows in [W, ts); the last long_len of the two together are read, so a heavy user keeps
    the largest clusters and the gap rows push out the smallest first. Reference: a sort per user."""
    items, beh, hist, imp = small_store(tmp_path, seed=3, max_len=60)
    W = 50 * DAY
    cl = clusters_for(beh, W, items)
    cl["size"] = np.random.default_rng(0).integers(1, 6, len(cl))            # ties included
    vocab = Vocab.build(items, {"liked": beh["liked"].to_numpy()})
    cf = cluster_features(cl, vocab)
    imp = imp[imp.ts >= W].reset_index(drop=True)
    s = make_samples(imp, hist, vocab, cf, watermark=W)
    raw = raw_features(hist, vocab)
    by_size = cf.by_size()
    np.testing.assert_array_equal(by_size.offsets, cf.offsets)
    b = SampleSet(s, raw, vocab, "clusters", long_len=long_len, short_len=4, clusters=by_size, watermark=W,
                  watermark_gap=True)[list(range(len(imp)))]
    assert len(imp) > 5 and (cl.groupby("user_id").size() > (long_len or 0)).any()
    for i, r in enumerate(imp.itertuples()):
        mine = cl[cl.user_id == r.user_id].sort_values(["size", "ts"], kind="stable")
        want_item, want_n = _clusters_then_gap(vocab, mine, beh, r, W, long_len)
        m = b["long"]["mask"][i].numpy()
        np.testing.assert_array_equal(b["long"]["item"][i].numpy()[m], want_item)
        np.testing.assert_allclose(b["long"]["log_n"][i].numpy()[m], want_n, rtol=1e-6)


def test_world_dataset_reads_the_largest_clusters_with_cluster_order_size(clustered_ro, params):
    """World.dataset hands TWIN-V2 the size-ordered cluster rows when model.cluster_order is size (the time-ordered
    ones otherwise), and a bad value is a clear error."""
    from tests.training.conftest import SMALL_MODEL
    from twinv2.models import build_model
    from twinv2.training.world import load_world

    world = load_world(clustered_ro, need_clusters=True)
    s = world.samples("test")
    p = {**params["model"], **SMALL_MODEL, "twin_window": 4}
    sets = {o: world.dataset(s, build_model("twinv2", world.vocab.sizes(), {**p, "cluster_order": o}))
            for o in ("time", "size")}
    assert sets["time"].clusters is world.clusters
    np.testing.assert_array_equal(sets["size"].clusters.log_n, world.clusters.by_size().log_n)
    i = list(range(len(s)))
    a, b = sets["time"][i]["long"], sets["size"][i]["long"]
    n_a = (a["log_n"].exp() * a["mask"]).sum()
    n_b = (b["log_n"].exp() * b["mask"]).sum()
    assert n_b > n_a                                 # the same budget covers more behaviours
    with pytest.raises(ValueError, match="cluster_order"):
        build_model("twinv2", world.vocab.sizes(), {**p, "cluster_order": "random"})
