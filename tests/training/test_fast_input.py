"""The fast batch path (twinv2.training.fastbatch, SampleSet's default) builds the same tensors as the reference
assembly (SampleSet.reference_batch: per store `_gather`, `_concat` of clusters and watermark-gap rows), and the
prefetching thread yields the loader's batches in order (issue 29)."""
import copy

import numpy as np
import pytest
import torch

from pipelines.train import build
from twinv2.training.prefetch import prefetch
from twinv2.training.samples import loader
from twinv2.training.world import load_world


def assert_same(a: dict, b: dict, path="", exact=False):
    assert a.keys() == b.keys(), (path, sorted(a), sorted(b))
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k], f"{path}{k}.", exact)
            continue
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, (path + k, x.dtype, y.dtype, x.shape, y.shape)
        if x.dtype.is_floating_point and not exact:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, msg=path + k)
        else:
            assert torch.equal(x, y), path + k


MODELS = [("twinv2", {}), ("twinv2", {"target_pop": True}), ("twinv2", {"watermark_gap": False, "virtual_mix": 0}),
          ("twinv2", {"twin_window": 0}),
          ("twin", {}), ("twin", {"short_len": 0}), ("din", {}), ("avg_pool", {})]


@pytest.mark.parametrize("name,extra", MODELS)
def test_fast_batches_equal_the_reference(clustered_ro, small_params, name, extra):
    p = copy.deepcopy(small_params)
    p["model"].update(extra)
    from twinv2.models import REGISTRY

    need = getattr(REGISTRY[name], "long_source", "raw") == "clusters"
    w = load_world(clustered_ro, need_clusters=need, features=p["train"].get("features"))
    model = build(name, w.vocab, p)
    for split in ("train", "valid"):
        s = w.samples(split)
        ds = w.dataset(s, model)
        assert ds.fast
        rng = np.random.default_rng(0)
        batches = [rng.permutation(len(s))[:64], np.arange(min(len(s), 7)), np.array([len(s) - 1])]
        for idx in batches:
            ds.per_sample = False
            per_batch = ds[idx]
            assert_same(per_batch, ds.reference_batch(idx))
            ds.per_sample = True                         # the per-sample inputs computed once: the same numbers
            assert_same(ds[idx], per_batch, exact=True)


def test_per_sample_inputs_follow_the_samples(clustered_ro, small_params):
    """The per-sample cache belongs to the set's current samples: a copy of the set given other samples (the
    scorer's template) recomputes, and chunked computation equals one pass."""
    import copy as cp

    from twinv2.training.fastbatch import per_sample

    w = load_world(clustered_ro, need_clusters=True, features=small_params["train"].get("features"))
    model = build("twinv2", w.vocab, small_params)
    ds = w.dataset(w.samples("train"), model)
    ds.per_sample = True
    whole = per_sample(ds)
    assert set(whole) == {"pop", "stats", "life"} and len(whole["pop"]) == len(ds)
    ds.__dict__.pop("_per_sample")
    chunked = per_sample(ds, chunk=7)
    for k in whole:
        assert np.array_equal(whole[k], chunked[k]), k
    other = cp.copy(ds)
    other.samples = w.samples("valid")
    idx = np.arange(min(len(other), 40))
    assert_same(other[idx], other.reference_batch(idx))
    assert len(per_sample(other)["pop"]) == len(other) != len(ds)


def test_edge_samples_equal_the_reference(clustered_ro, small_params):
    """Unknown users, empty histories, a sample at a behaviour's ts: the two paths agree."""
    import pandas as pd

    w = load_world(clustered_ro, need_clusters=True, features=small_params["train"].get("features"))
    model = build("twinv2", w.vocab, small_params)
    imp = w.impressions[w.impressions["split"] == "test"].head(20).copy()
    extra = imp.head(3).copy()
    extra["user_id"] = [10**12, 10**12 + 1, 10**12 + 2]                 # unknown users: no history, no clusters
    r = int(np.flatnonzero(w.hist.cols["ts"] >= w.watermark)[0])                 # a behaviour after W
    u0 = int(w.hist.user_ids[np.searchsorted(w.hist.offsets, r, side="right") - 1])
    at = imp.head(1).copy()
    at["user_id"], at["ts"] = u0, int(w.hist.cols["ts"][r])                        # exactly at its ts
    frame = pd.concat([imp, extra, at], ignore_index=True)
    ds = w.dataset(w.samples(impressions=frame), model)
    idx = np.arange(len(frame))
    assert_same(ds[idx], ds.reference_batch(idx))


def test_prefetch_yields_the_loader_batches_in_order(clustered_ro, small_params):
    w = load_world(clustered_ro, need_clusters=True, features=small_params["train"].get("features"))
    model = build("twinv2", w.vocab, small_params)
    ds = w.dataset(w.samples("train"), model)
    ld = loader(ds, 32, shuffle=True, seed=3)
    ld.sampler.set_epoch(2)
    plain = list(ld)
    ahead = list(prefetch(ld, 3, "cpu"))
    assert len(plain) == len(ahead) > 1
    for a, b in zip(plain, ahead):
        assert_same(a, b)


def test_prefetch_raises_the_loader_error():
    def bad():
        yield {"x": torch.zeros(1)}
        raise ValueError("broken batch")

    it = prefetch(bad(), 2)
    next(it)
    with pytest.raises(ValueError, match="broken batch"):
        next(it)
