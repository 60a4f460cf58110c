"""TWIN attention against plain references: ln(n) == repetition, GSU top-k == per-sample loop,
cache == inline, one module for GSU and ESU with gradients into the scoring weights."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings, strategies as st

from tests.models.conftest import SMALL, VOCAB, make_batch
from twinv2.models import build_model
from twinv2.models.attention import TwinAttention
from twinv2.models.layers import Features


def _module(use_log_n=True, seed=0):
    torch.manual_seed(seed)
    f = Features(VOCAB, 8, 4, 4).double()
    a = TwinAttention(f.d_h, f.n_cross, f.cross_dim, 2, 4, use_log_n=use_log_n).double()
    return f, a


def _repeat(seq, b, sizes):
    """Row b of a cluster sequence with each real virtual item repeated n times (log_n = 0)."""
    real = int(seq["mask"][b].sum())
    rep = torch.repeat_interleave(torch.arange(real), torch.as_tensor(sizes[:real]))
    out = {k: seq[k][b:b + 1, rep] for k in ("item", "author", "category", "dur_bucket", "cross")}
    out["mask"] = torch.ones(1, len(rep), dtype=torch.bool)
    out["log_n"] = torch.zeros(1, len(rep), dtype=torch.float64)
    return out


def test_log_n_attention_equals_repeating_each_virtual_item_n_times():
    f, att = _module(use_log_n=True)
    batch = make_batch(B=3, L=9, long_lens=[9, 4, 7], seed=1)
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 8, (3, 9), generator=g)
    seq = dict(batch["long"])
    seq["log_n"] = torch.log(sizes.double()) * seq["mask"]
    q = f.inherent(batch["target"])
    got = att.attend(q, seq, f)                                    # (B, H*dk) with + ln n
    wrong = seq | {"log_n": -seq["log_n"]}                         # the sign some public code uses
    bad = att.attend(q, wrong, f)
    for b in range(3):
        ref = att.attend(q[b:b + 1], _repeat(seq, b, sizes[b].tolist()), f)[0]
        assert torch.allclose(got[b], ref, atol=1e-10), (b, got[b], ref)
        if sizes[b, : int(seq["mask"][b].sum())].unique().numel() > 1:
            assert not torch.allclose(bad[b], ref, atol=1e-6)


@torch.no_grad()
def _plain_scores(f, att, q_target, seq, b):
    """alpha' of every position of row b, one behaviour and one head at a time (plain Python)."""
    H, dk = att.H, att.dk
    qv = att.w_q.weight @ f.inherent({k: v[b] for k, v in q_target.items()})   # (H*dk,)
    out = []
    for i in range(seq["mask"].shape[1]):
        kh = torch.cat([f.item.weight[seq["item"][b, i]], f.author.weight[seq["author"][b, i]],
                        f.category.weight[seq["category"][b, i]], f.dur_bucket.weight[seq["dur_bucket"][b, i]]])
        kv = att.w_h.weight @ kh
        heads = []
        for h in range(H):
            s = float(kv[h * dk:(h + 1) * dk] @ qv[h * dk:(h + 1) * dk]) / math.sqrt(dk)
            for j in range(att.J):
                s += float(f.cross[j].weight[seq["cross"][b, i, j]] @ att.w_c[j]) * float(att.beta[h, j])
            if att.use_log_n:
                s += float(seq["log_n"][b, i])
            heads.append(s)
        out.append(sum(heads) / H)
    return out


def test_batched_gsu_topk_equals_per_sample_loop():
    f, att = _module(use_log_n=True, seed=4)
    batch = make_batch(B=5, L=16, long_lens=[16, 3, 0, 11, 6], seed=5, clusters=True)
    seq = batch["long"]
    k = 5
    idx, valid = att.gsu(f.inherent(batch["target"]), seq, f, k)
    for b in range(5):
        s = _plain_scores(f, att, batch["target"], seq, b)
        real = [i for i in range(16) if seq["mask"][b, i]]
        want = sorted(real, key=lambda i: -s[i])[:k]
        got = [int(i) for i, v in zip(idx[b], valid[b]) if v]
        assert sorted(got) == sorted(want), (b, got, want)
        assert int(valid[b].sum()) == min(k, len(real))


def test_gsu_selects_the_top_of_the_esu_scores_of_the_same_module():
    """Consistency: the GSU ranking is the ESU's own attention logits (same parameter values)."""
    f, att = _module(use_log_n=True, seed=6)
    batch = make_batch(B=4, L=30, seed=7, clusters=True)
    q, seq = f.inherent(batch["target"]), batch["long"]
    idx, _ = att.gsu(q, seq, f, 6)
    kp, cs, _ = att.project(seq, f)
    a = att.scores(att.query(q), kp, cs, seq["log_n"]).mean(-1)
    assert torch.equal(idx.sort(1).values, a.topk(6, dim=1).indices.sort(1).values)


def test_gsu_and_esu_share_one_module_and_gradients_reach_scoring_weights():
    for name in ("twinv2", "twin", "twin_full"):
        torch.manual_seed(0)
        m = build_model(name, VOCAB, SMALL)
        assert m.topk < m.long_len
        attn = [mod for n, mod in m.named_modules() if isinstance(mod, TwinAttention) and n != "short"]
        assert len(attn) == 1 and attn[0] is m.long_attn          # one module: GSU == ESU parameters
        b = make_batch(B=6, L=m.long_len, seed=1, clusters=name == "twinv2")
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(b), b["label"])
        loss.backward()
        for p in ("w_h", "w_q", "w_c", "beta", "w_v"):
            g = getattr(m.long_attn, p)
            g = g.weight.grad if hasattr(g, "weight") else g.grad
            assert g is not None and g.abs().sum() > 0, (name, p)
        # the GSU reads those same weights: changing W^h changes what it retrieves
        before = m.retrieve(b)[0].sort(1).values
        with torch.no_grad():
            m.long_attn.w_h.weight.mul_(-1.0)
        assert not torch.equal(before, m.retrieve(b)[0].sort(1).values)


def test_cached_projections_equal_inline():
    for name in ("twinv2", "twin", "eta", "sim_hard", "sim_soft"):
        torch.manual_seed(1)
        m = build_model(name, VOCAB, SMALL).double().eval()
        b = make_batch(B=5, L=m.long_len, long_lens=[m.long_len, 2, 0, 9, 5], seed=2, clusters=name == "twinv2")
        b["long"]["log_n"] = b["long"]["log_n"].double()
        b["short"]["log_n"] = b["short"]["log_n"].double()
        inline, r_inline = m(b), m.retrieve(b)
        m.build_item_cache()
        assert all(a._cache is not None for a in m.attention_modules())
        cached, r_cached = m(b), m.retrieve(b)
        assert torch.allclose(inline, cached, atol=1e-10), name
        assert torch.equal(r_inline[0], r_cached[0]) and torch.equal(r_inline[1], r_cached[1])
        m.train()                                                      # training drops a stale cache
        assert all(a._cache is None for a in m.attention_modules())


def test_cache_projection_tables_match_the_linear_maps():
    f, att = _module(seed=9)
    b = make_batch(B=3, L=12, seed=3)
    kp, cs, v = att.project(b["long"], f)
    att.build_cache(f)
    kp2, cs2, v2 = att.project(b["long"], f)
    assert torch.allclose(kp, kp2, atol=1e-12) and torch.allclose(cs, cs2, atol=1e-12)
    assert torch.allclose(v, v2, atol=1e-12)


def _one_user_many_candidates(name, n_cand=7, L_real=None, seed=4, extra=None):
    torch.manual_seed(1)
    m = build_model(name, VOCAB, {**SMALL, **(extra or {})}).double().eval()
    user = make_batch(B=1, L=m.long_len, long_lens=[L_real or m.long_len], seed=seed, clusters=name == "twinv2")
    cands = make_batch(B=n_cand, L=1, seed=seed + 1)["target"]
    for part in ("long", "short"):
        user[part]["log_n"] = user[part]["log_n"].double()
    bcast = {"target": cands, **{p: {k: v.expand(n_cand, *v.shape[1:]) for k, v in user[p].items()}
                                 for p in ("long", "short")}}
    copied = {"target": cands, **{p: {k: v.contiguous() for k, v in bcast[p].items()} for p in ("long", "short")}}
    return m, bcast, copied


def test_serving_path_for_one_user_equals_the_training_path():
    """One user's sequences broadcast over candidates (stride 0) take gsu_esu_shared (project once, gather
    projections); the same rows copied per candidate take GSU + gather + ESU re-projection: same scores."""
    variants = [{}, {"match_mass": True}, {"target_match": ["category", "item"]}]   # mass, per-candidate terms
    for name, extra in [(n, e) for n in ("twinv2", "twin") for e in variants]:
        for L_real in (None, 3):                                  # more and fewer real rows than topk
            m, bcast, copied = _one_user_many_candidates(name, L_real=L_real, extra=extra)
            calls = []
            orig = m.long_attn.gsu_esu_shared
            m.long_attn.gsu_esu_shared = lambda *a, **k: calls.append(1) or orig(*a, **k)
            with torch.no_grad():
                fast, ref = m(bcast), m(copied)
            assert calls == [1], "the broadcast batch must take the shared path, the copied one must not"
            assert torch.allclose(fast, ref, atol=1e-10), (name, extra, L_real)
            m.build_item_cache()
            with torch.no_grad():
                assert torch.allclose(m(bcast), ref, atol=1e-10), (name, extra, L_real, "cached")


def test_top_k_keeps_the_k_largest_of_each_row():
    """attention.top_k (a partial selection on the CPU) against torch.topk: the same set per row."""
    from twinv2.models.attention import top_k

    g = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    g[3, 10:] = float("-inf")                                       # padding: fewer real rows than k
    for k in (1, 7, 29, 30, 45):
        got = top_k(g, min(k, 30))
        want = torch.topk(g, min(k, 30), dim=1).indices
        assert got.shape == want.shape
        assert all(len(set(r.tolist())) == r.numel() for r in got), k                # k distinct rows
        same = torch.gather(g, 1, got).sort(1).values == torch.gather(g, 1, want).sort(1).values
        assert same.all(), k                                        # the same values (ties: either row)


def test_gsu_scores_equal_the_head_mean_of_alpha():
    """gsu_scores (K_h . u per row, per-id cross scalars; no row projection) == scores(...).mean over heads, with
    ln n and with target-match terms, and so gsu() keeps the same rows as ranking by the full alpha'."""
    for use_log_n, match in ((True, ()), (False, ("category", "item"))):
        torch.manual_seed(3)
        f = Features(VOCAB, 8, 4, 4).double()
        a = TwinAttention(f.d_h, f.n_cross, f.cross_dim, 3, 4, use_log_n=use_log_n, match_fields=match).double()
        if match:
            torch.nn.init.normal_(a.beta_m)
        b = make_batch(B=5, L=17, seed=8, clusters=True)
        b["long"]["log_n"] = b["long"]["log_n"].double()
        q = f.inherent(b["target"])
        kp, cs, _ = a.project(b["long"], f, values=False)
        full = a.scores(a.query(q), kp, cs, b["long"]["log_n"], a.target_match(b["long"], b["target"])).mean(-1)
        got = a.gsu_scores(q, b["long"], f, b["target"])
        assert torch.allclose(got.double(), full.double(), atol=1e-5), (use_log_n, match, (got - full).abs().max())
        idx, _ = a.gsu(q, b["long"], f, 4, b["target"])
        want = torch.topk(full.masked_fill(~b["long"]["mask"], float("-inf")), 4, dim=1).indices
        assert (idx.sort(1).values == want.sort(1).values).all()


def _per_row_attend(att, f, q_kh, seq, target):
    """The ESU with every row projected: keys K_h W^h, values [K_h, K_c] W^v, then scores and pool (the
    reference attend_rows is held to)."""
    kh = f.inherent(seq)
    ce = f.cross_emb(seq)
    B, L = seq["mask"].shape
    kp = att.w_h(kh).view(B, L, att.H, att.dk)
    v = att.w_v(torch.cat([kh, ce.flatten(-2)], dim=-1)).view(B, L, att.H, att.dk)
    cs = torch.einsum("bljc,jc->blj", ce, att.w_c)
    a = att.scores(att.query(q_kh), kp, cs, seq["log_n"], att.target_match(seq, target))
    return att.pool(a, seq["mask"], v)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), B=st.integers(1, 5), L=st.integers(1, 12), log_n=st.booleans(),
       mass=st.booleans(), match=st.sampled_from([(), ("category",), ("category", "item")]))
def test_attend_rows_equals_projecting_every_row(seed, B, L, log_n, mass, match):
    """attend_rows (the query moved into K_h space, raw rows pooled before W^v) == per-row projections, in value
    and in every parameter's gradient, for any lengths and padding (all-padding rows included)."""
    torch.manual_seed(seed)
    f = Features(VOCAB, 8, 4, 4).double()
    att = TwinAttention(f.d_h, f.n_cross, f.cross_dim, 3, 4, use_log_n=log_n, mass=mass,
                        match_fields=match).double()
    if match:
        torch.nn.init.normal_(att.beta_m)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, L + 1, (B,), generator=g).tolist()
    batch = make_batch(B=B, L=L, long_lens=lens, seed=seed)
    seq = dict(batch["long"])
    seq["log_n"] = (torch.rand(B, L, generator=g, dtype=torch.float64) * 3) * seq["mask"]
    t = batch["target"]
    outs, grads = [], []
    for fn in (lambda: att.attend_rows(f.inherent(t), seq, f, t),
               lambda: _per_row_attend(att, f, f.inherent(t), seq, t)):
        for p in [*f.parameters(), *att.parameters()]:
            p.grad = None
        out = fn()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([None if p.grad is None else p.grad.clone() for p in [*f.parameters(), *att.parameters()]])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-10)
    for a, b in zip(*grads):
        if a is None or b is None:
            assert a is None or not a.any(), "a gradient only one path produces"
            assert b is None or not b.any(), "a gradient only one path produces"
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    with torch.no_grad():
        assert torch.equal(att.attend(f.inherent(t), seq, f, t), outs[0])         # attend takes this path
