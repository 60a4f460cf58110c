"""The life-cycle levers of docs/models.md ("What the models read besides attention"): match counts, the target
popularity bucket, ln n in TWIN-V2's scores, each against a plain reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.models.conftest import SMALL, VOCAB, make_batch, pad_to
from twinv2.models import MODEL_NAMES, build_model
from twinv2.models.base import match_counts, match_recency
from twinv2.training.samples import RowFeatures

FIELDS = ("category", "author", "item")
LEVERS = {**SMALL, "target_pop": True, "target_stats": True, "match_counts": list(FIELDS)}
VOCAB_POP = {**VOCAB, "pop": 7}


def _with_pop(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch["target"]["pop"] = torch.randint(1, VOCAB_POP["pop"], batch["target"]["item"].shape, generator=g)
    batch["target"]["stats"] = torch.rand(batch["target"]["item"].shape + (4,), generator=g)
    for part in ("long", "short"):
        batch[part]["comp"] = torch.rand(batch[part]["mask"].shape, generator=g) * 2 * batch[part]["mask"]
    return batch


def _naive_counts(seq, target, fields):
    B, L = seq["mask"].shape
    F = len(fields)
    out = torch.zeros(B, 4 * F + 2)
    for b in range(B):
        N, P, C, D = 0.0, 0.0, [0.0] * F, [0.0] * F
        for i in range(L):
            if not bool(seq["mask"][b, i]):
                continue
            n = math.exp(float(seq["log_n"][b, i]))
            c = float(seq["comp"][b, i]) if "comp" in seq else 1.0
            N, P = N + n, P + n * c
            for j, f in enumerate(fields):
                if int(seq[f][b, i]) == int(target[f][b]):
                    C[j] += n
                    D[j] += n * c
        row = [math.log1p(x) for x in C] + [x / N if N else 0.0 for x in C]
        row += [math.log1p(x) for x in D] + [x / P if P else 0.0 for x in D]
        out[b] = torch.tensor(row + [math.log1p(N), P / max(N, 1.0)])
    return out


@pytest.mark.parametrize("clusters,comp", [(False, False), (True, False), (False, True), (True, True)])
def test_match_counts_equal_a_per_sample_loop(clusters, comp):
    batch = make_batch(B=6, L=15, long_lens=[15, 0, 3, 9, 1, 14], seed=3, clusters=clusters)
    if comp:
        batch["long"]["comp"] = torch.rand(6, 15, generator=torch.Generator().manual_seed(1)) * 2 * batch["long"]["mask"]
    # plant matches: some long rows take the target's category / author / item
    for b in range(6):
        batch["long"]["category"][b, :2] = batch["target"]["category"][b] * batch["long"]["mask"][b, :2]
        batch["long"]["item"][b, 2:3] = batch["target"]["item"][b] * batch["long"]["mask"][b, 2:3]
    got = match_counts(batch["long"], batch["target"], FIELDS)
    ref = _naive_counts(batch["long"], batch["target"], FIELDS)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got[1].abs().sum() == 0                       # an empty sequence counts nothing
    assert (got[:, 0] > 0).sum() >= 4                    # the planted category matches are counted


@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.integers(0, 12), min_size=3, max_size=3), extra=st.integers(1, 6), seed=st.integers(0, 50),
       name=st.sampled_from(MODEL_NAMES))
def test_models_with_levers_are_invariant_to_padding(lens, extra, seed, name):
    torch.manual_seed(seed)
    model = build_model(name, VOCAB_POP, LEVERS if name != "twin_full" else {**LEVERS, "twin_full_len": 40}).eval()
    batch = _with_pop(make_batch(B=3, L=12, long_lens=lens, seed=seed, clusters=name == "twinv2"), seed)
    with torch.no_grad():
        a = model(batch)
        b = model(pad_to(batch, "long", 12 + extra))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_levers_change_the_head_input_and_reach_the_logit():
    torch.manual_seed(0)
    model = build_model("twinv2", VOCAB_POP, LEVERS).eval()
    batch = _with_pop(make_batch(B=4, L=12, seed=1, clusters=True))
    with torch.no_grad():
        base = model(batch)
        other = dict(batch, target=dict(batch["target"], pop=batch["target"]["pop"] % 6 + 1))
        assert not torch.allclose(base, model(other))                    # the popularity bucket is read
        other = dict(batch, target=dict(batch["target"], stats=batch["target"]["stats"] + 1))
        assert not torch.allclose(base, model(other))                    # the target stats are read
        long = dict(batch["long"], category=batch["long"]["category"].clone())
        long["category"][:, :4] = batch["target"]["category"].unsqueeze(1) * long["mask"][:, :4]
        assert not torch.allclose(base, model(dict(batch, long=long)))    # the match counts are read


def test_twinv2_adds_ln_n_to_twin_scores():
    """TWIN-V2's alpha' = TWIN's alpha + ln n with the same weights (turning ln n off fails here)."""
    torch.manual_seed(0)
    v2 = build_model("twinv2", VOCAB, SMALL).eval()
    tw = build_model("twin", VOCAB, SMALL).eval()
    tw.load_state_dict(v2.state_dict())
    batch = make_batch(B=3, L=10, seed=2, clusters=True)
    seq = batch["long"]
    assert float(seq["log_n"].abs().max()) > 1.0
    q = v2.features.inherent(batch["target"])
    outs = []
    for m in (v2, tw):
        kp, cs, _ = m.long_attn.project(seq, m.features, values=False)
        outs.append(m.long_attn.scores(m.long_attn.query(q), kp, cs, seq["log_n"]))
    torch.testing.assert_close(outs[0] - outs[1], seq["log_n"].unsqueeze(-1).expand_as(outs[0]), rtol=1e-5, atol=1e-5)
    # and the ln n term changes what the model outputs and retrieves
    with torch.no_grad():
        no_n = dict(batch, long=dict(seq, log_n=torch.zeros_like(seq["log_n"])))
        assert not torch.allclose(v2(batch), v2(no_n))


def test_item_counts_before_equal_a_loop_and_never_read_ts_or_later():
    rng = np.random.default_rng(0)
    n = 400
    item = rng.integers(1, 9, n)
    ts = rng.integers(0, 50, n).astype(np.float64)            # many ties
    rows = RowFeatures(np.array([1]), np.array([0, n]), item, item, item, item, np.zeros((n, 2), np.int32), ts,
                       np.zeros(n, np.float32))
    q_item = rng.integers(0, 10, 300)
    q_ts = rng.integers(-2, 53, 300)
    got = rows.item_counts_before(q_item, q_ts)
    ref = np.array([int(((item == i) & (ts < t)).sum()) for i, t in zip(q_item, q_ts)])
    np.testing.assert_array_equal(got, ref)


def test_counts_before_with_completion_equal_a_loop():
    """target_stats: views of an author (or item) strictly before ts and the sum of their min(completion, 1)."""
    rng = np.random.default_rng(1)
    n = 500
    item, author = rng.integers(1, 12, n), rng.integers(1, 5, n)
    ts = rng.integers(0, 40, n).astype(np.float64)
    comp = rng.uniform(0, 2, n).astype(np.float32)
    rows = RowFeatures(np.array([1]), np.array([0, n]), item, author, item, item, np.zeros((n, 2), np.int32), ts,
                       np.zeros(n, np.float32), comp)
    q, q_ts = rng.integers(0, 6, 200), rng.integers(-1, 42, 200)
    cnt, csum = rows.counts_before("author", q, q_ts)
    for k, (a, t) in enumerate(zip(q, q_ts)):
        sel = (author == a) & (ts < t)
        assert cnt[k] == sel.sum()
        assert abs(csum[k] - np.minimum(comp[sel], 1.0).sum()) < 1e-4
    # every query after the last row (serving at "now"): the totals path, the same loop
    late = np.full(200, 41 + rng.integers(1, 1000))
    cnt2, csum2 = rows.counts_before("author", np.r_[q[:-1], 99], late)       # 99: an id beyond the table
    for k, a in enumerate(np.r_[q[:-1], 99]):
        sel = author == a
        assert cnt2[k] == sel.sum() and abs(csum2[k] - np.minimum(comp[sel], 1.0).sum()) < 1e-4


def test_twinv2_with_virtual_mix_reads_the_life_counts():
    """virtual_mix: the long part's counts come from batch["life"] (samples.LifeCounts), not from the long
    sequence; a batch without them is refused; padding the long sequence changes nothing."""
    torch.manual_seed(0)
    model = build_model("twinv2", VOCAB_POP, {**LEVERS, "virtual_mix": 4}).eval()
    batch = _with_pop(make_batch(B=4, L=10, long_lens=[10, 0, 3, 7], seed=2, clusters=True), 2)
    with pytest.raises(ValueError, match="life"):
        model(batch)
    batch["life"] = torch.rand(4, 4 * len(FIELDS) + 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(batch)
        assert not torch.allclose(base, model(dict(batch, life=batch["life"] + 1)))
        torch.testing.assert_close(base, model(pad_to(batch, "long", 14)), rtol=1e-5, atol=1e-5)
        long = dict(batch["long"], category=batch["long"]["category"].clone())
        long["category"][:, :3] = batch["target"]["category"].unsqueeze(1) * long["mask"][:, :3]
        changed = model(dict(batch, long=long))                 # attention still reads the sequence
    assert not torch.allclose(base, changed)
    with pytest.raises(ValueError, match="virtual_mix"):
        build_model("twinv2", VOCAB_POP, {**LEVERS, "virtual_mix": 4, "match_counts": ["category"]})


@pytest.mark.parametrize("name", ["twinv2", "twin", "din"])
def test_id_biases_add_the_target_rows_to_the_logit(name):
    """item_bias / author_bias: the logit is the model's logit without them plus the target item's and the
    target author's learned scalar (a plain sum, checked per sample); both start at 0 (no change at init) and
    the padding row never moves."""
    batch = make_batch(B=5, L=12, seed=4, clusters=name == "twinv2")
    plain = build_model(name, VOCAB, SMALL).eval()
    biased = build_model(name, VOCAB, {**SMALL, "item_bias": True, "author_bias": True}).eval()
    missing, unexpected = biased.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["author_bias.weight", "item_bias.weight"] and not unexpected
    with torch.no_grad():
        assert torch.equal(biased(batch), plain(batch))                  # zero init: the same model
        biased.item_bias.weight.normal_()
        biased.author_bias.weight.normal_()
        biased.item_bias.weight[0] = 0.0
        biased.author_bias.weight[0] = 0.0
        got = biased(batch)
        want = plain(batch).clone()
        for b in range(5):
            want[b] += biased.item_bias.weight[int(batch["target"]["item"][b]), 0]
            want[b] += biased.author_bias.weight[int(batch["target"]["author"][b]), 0]
    torch.testing.assert_close(got, want)
    biased.train()
    biased(batch).sum().backward()
    assert biased.author_bias.weight.grad[0].abs().sum() == 0 and biased.item_bias.weight.grad[0].abs().sum() == 0
    assert biased.author_bias.weight.grad[batch["target"]["author"]].abs().sum() > 0


@pytest.mark.parametrize("name", ["twinv2", "sim_soft"])
def test_user_bias_adds_the_users_hashed_row_to_the_logit(name):
    """user_bias: the logit plus the scalar in row 1 + (user_id mod (buckets - 1)) (checked per sample against
    that formula, two users sharing a row share the scalar); zero at init; no 'user' in the batch is a clear error."""
    batch = make_batch(B=6, L=12, seed=5, clusters=name == "twinv2")
    batch["user"] = torch.tensor([3, 10, 17, 3, 0, 123456789], dtype=torch.int64)   # 3, 10, 17 share row 4 (mod 7)
    plain = build_model(name, VOCAB, SMALL).eval()
    biased = build_model(name, VOCAB, {**SMALL, "user_bias": True, "user_bias_buckets": 8}).eval()
    missing, unexpected = biased.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["user_bias.weight"] and not unexpected
    with torch.no_grad():
        assert torch.equal(biased(batch), plain(batch))
        biased.user_bias.weight.normal_()
        got, want = biased(batch), plain(batch).clone()
        for b in range(6):
            want[b] += biased.user_bias.weight[1 + int(batch["user"][b]) % 7, 0]
        d = got - plain(batch)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(d[[1, 2, 3]], d[[0, 0, 0]])              # one row, one scalar
    with pytest.raises(ValueError, match="'user'"):
        biased({k: v for k, v in batch.items() if k != "user"})
    with pytest.raises(ValueError, match="user_bias_buckets"):
        build_model(name, VOCAB, {**SMALL, "user_bias": True, "user_bias_buckets": 1})


@pytest.mark.parametrize("name", ["twinv2", "twin"])
def test_user_feedback_reaches_the_head(name):
    """user_feedback: target["feedback"] (B, 2) is an input of the head (changing it changes the logit, only of
    the samples whose feedback changed); a batch without it is a clear error."""
    batch = make_batch(B=4, L=10, seed=6, clusters=name == "twinv2")
    batch["target"]["feedback"] = torch.tensor([[0.0, 0.3], [1.0, 0.2], [2.0, 0.5], [3.0, 0.1]])
    model = build_model(name, VOCAB, {**SMALL, "user_feedback": True}).eval()
    with torch.no_grad():
        base = model(batch)
        other = {**batch, "target": {**batch["target"], "feedback": batch["target"]["feedback"].clone()}}
        other["target"]["feedback"][2] = torch.tensor([4.0, 0.9])
        changed = model(other)
    assert torch.equal(changed[[0, 1, 3]], base[[0, 1, 3]]) and changed[2] != base[2]
    with pytest.raises(ValueError, match="feedback"):
        model({**batch, "target": {k: v for k, v in batch["target"].items() if k != "feedback"}})


def test_bias_lr_moves_the_id_biases_at_their_own_rate():
    """train.bias_lr: the item / author / user bias tables form their own Adam group; Adam's first step moves
    every coordinate with a gradient by exactly its group's rate, so the biases move by bias_lr, the rest by lr."""
    from twinv2.training.loop import TrainConfig, make_optimizer

    batch = make_batch(B=6, L=10, seed=7, clusters=True)
    batch["user"] = torch.arange(6)
    model = build_model("twinv2", VOCAB, {**SMALL, "item_bias": True, "author_bias": True, "user_bias": True,
                                          "user_bias_buckets": 16})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=1e-3, bias_lr=1e-2))
    assert [len(g["params"]) for g in opt.param_groups] == [len(before) - 3, 1, 1, 1]
    model(batch).sum().backward()
    opt.step()
    for name in ("item_bias.weight", "author_bias.weight", "user_bias.weight"):
        moved = (dict(model.named_parameters())[name].detach() - before[name]).abs()
        assert moved.max().item() == pytest.approx(1e-2, rel=1e-3) and moved[0].item() == 0.0, name
    head = (model.head.net[0].weight.detach() - before["head.net.0.weight"]).abs()
    assert head.max().item() == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="bias_lr"):
        make_optimizer(model, TrainConfig(lr=1e-3, bias_lr=-1.0))
    # user_bias_lr alone: only the user table leaves the main group
    opt = make_optimizer(model, TrainConfig(lr=1e-3, user_bias_lr=5e-2))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-2] and opt.param_groups[1]["params"][0] is model.user_bias.weight
    assert len(make_optimizer(model, TrainConfig(lr=1e-3)).param_groups) == 1
    # wrapped as DDP wraps it (parameters named module.*): the same groups (the multinode test caught this)
    wrapper = torch.nn.Module()
    wrapper.module = model
    opt = make_optimizer(wrapper, TrainConfig(lr=1e-3, user_bias_lr=5e-2))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-2] and opt.param_groups[1]["params"][0] is model.user_bias.weight


@settings(max_examples=20, deadline=None)
@given(F=st.integers(1, 5), k=st.integers(1, 4), d=st.integers(1, 3), seed=st.integers(0, 100))
def test_periodic_embedding_equals_a_per_feature_loop(F, k, d, seed):
    """PeriodicEmbedding against the formula written per sample and feature: e_j = ReLU(W_j [sin 2pi c x, cos 2pi c x] + b_j)."""
    from twinv2.models.layers import PeriodicEmbedding
    torch.manual_seed(seed)
    emb = PeriodicEmbedding(F, k, d, sigma=0.7)
    x = torch.randn(3, F) * 3
    with torch.no_grad():
        got = emb(x)                                                               # (3, F * d)
    for b in range(3):
        for j in range(F):
            v = [math.sin(2 * math.pi * float(emb.freq[j, i]) * float(x[b, j])) for i in range(k)]
            v += [math.cos(2 * math.pi * float(emb.freq[j, i]) * float(x[b, j])) for i in range(k)]
            for o in range(d):
                ref = float(emb.bias[j, o]) + sum(v[i] * float(emb.weight[j, i, o]) for i in range(2 * k))
                assert got[b, j * d + o].item() == pytest.approx(max(ref, 0.0), abs=1e-5)
    with pytest.raises(ValueError, match=r"\(B, %d\)" % F):
        emb(torch.randn(3, F + 1))


@pytest.mark.parametrize("name", ["twinv2", "twin", "din"])
def test_numeric_embed_feeds_the_scalars_to_the_head_as_embeddings(name):
    """model.numeric_embed k: the head's scalar inputs (stats, feedback, match counts) pass through one
    PeriodicEmbedding sized to them; its output reaches the logit, padding stays invariant, off = no module."""
    p = {**LEVERS, "user_feedback": True, "numeric_embed": 3, "numeric_dim": 4}
    torch.manual_seed(0)
    model = build_model(name, VOCAB_POP, p).eval()
    n_scalar = 4 + 2 + len(model.parts()) * (4 * 3 + 2)
    assert model.numeric is not None and model.numeric.n_features == n_scalar
    batch = _with_pop(make_batch(B=4, L=12, seed=2, clusters=name == "twinv2"))
    batch["target"]["feedback"] = torch.tensor([[0.0, 0.3], [1.0, 0.2], [2.0, 0.5], [3.0, 0.1]])
    with torch.no_grad():
        base = model(batch)
        torch.testing.assert_close(base, model(pad_to(batch, "long", 15)), rtol=1e-5, atol=1e-5)
        model.numeric.bias.add_(1.0)                       # the embedding's output is read by the head
        assert not torch.allclose(base, model(batch))
    assert build_model(name, VOCAB_POP, {**LEVERS, "numeric_embed": 0}).numeric is None


def _naive_recency(seq, target, fields, n_gap):
    B, L = seq["mask"].shape
    out = torch.ones(B, len(fields) + 1)
    for b in range(B):
        for i in range(L):
            if not bool(seq["mask"][b, i]):
                continue
            g = float(seq["cross"][b, i, 2]) / n_gap
            out[b, -1] = min(out[b, -1], g)
            for j, f in enumerate(fields):
                if int(seq[f][b, i]) == int(target[f][b]):
                    out[b, j] = min(out[b, j], g)
    return out


@pytest.mark.parametrize("clusters", [False, True])
def test_match_recency_equals_a_per_sample_loop(clusters):
    batch = make_batch(B=6, L=15, long_lens=[15, 0, 3, 9, 1, 14], seed=4, clusters=clusters)
    n_gap = VOCAB["cross"][2]
    for b in range(6):                                   # plant matches at known gaps
        batch["long"]["category"][b, 1:3] = batch["target"]["category"][b] * batch["long"]["mask"][b, 1:3]
        batch["long"]["item"][b, 0] = batch["target"]["item"][b] * batch["long"]["mask"][b, 0]
    batch["long"]["cross"][..., 2] = torch.randint(1, n_gap, batch["long"]["mask"].shape) * batch["long"]["mask"]
    got = match_recency(batch["long"], batch["target"], FIELDS, n_gap)
    torch.testing.assert_close(got, _naive_recency(batch["long"], batch["target"], FIELDS, n_gap))
    assert torch.all(got[1] == 1.0)                      # an empty sequence: nothing read, every entry 1
    assert (got[:, 0] < 1).sum() >= 4                    # the planted category matches are seen


@pytest.mark.parametrize("name", ["twinv2", "twin", "din"])
def test_match_recency_reaches_the_head_and_ignores_padding(name):
    p = {**LEVERS, "match_recency": True}
    torch.manual_seed(0)
    model = build_model(name, VOCAB_POP, p).eval()
    off = build_model(name, VOCAB_POP, LEVERS)
    batch = _with_pop(make_batch(B=4, L=12, seed=2, clusters=name == "twinv2"))
    with torch.no_grad():
        base = model(batch)
        torch.testing.assert_close(base, model(pad_to(batch, "long", 15)), rtol=1e-5, atol=1e-5)
        short = dict(batch["short"], cross=batch["short"]["cross"].clone())
        short["cross"][..., 2] = torch.where(short["mask"], torch.full_like(short["cross"][..., 2], 1),
                                             short["cross"][..., 2])   # every short row read just now
        assert not torch.allclose(base, model(dict(batch, short=short)))
    # F + 1 more head inputs per sequence read; off: none
    extra = model.head.net[0].in_features - off.head.net[0].in_features
    assert extra == len(model.parts()) * (len(FIELDS) + 1)
