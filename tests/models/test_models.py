"""Every registered model: the contract, masks and padding (hypothesis), and each baseline's retrieval
against a naive per-sample reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.models.conftest import SMALL, VOCAB, make_batch, pad_to
from twinv2.models import MODEL_NAMES, build_model


def _model(name, seed=0):
    torch.manual_seed(seed)
    return build_model(name, VOCAB, SMALL).eval()


MODELS = {name: _model(name) for name in MODEL_NAMES}


def test_registry_and_contract_attributes(params):
    assert set(MODEL_NAMES) == {"twinv2", "twin", "twin_full", "sim_hard", "sim_soft", "eta", "sdim", "din",
                                "avg_pool"}
    for name in MODEL_NAMES:
        m = build_model(name, VOCAB, params)                  # the repository's params.yaml works
        assert m.long_source in ("raw", "clusters", "none")
        assert isinstance(m.long_len, int) and m.long_len > 0
        assert m.item_embedding_table().shape == (VOCAB["item"], params["model"]["embed_dim"])
    assert MODELS["twinv2"].long_source == "clusters"
    assert MODELS["twin"].long_len == SMALL["twin_window"] and MODELS["twin_full"].long_len == SMALL["twin_full_len"]
    assert MODELS["din"].long_len == SMALL["din_len"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shapes_and_all_padding_rows_are_finite(name):
    m = _model(name).train()
    L = m.long_len
    b = make_batch(B=4, L=L, long_lens=[L, 0, 3, 0], short_lens=[6, 0, 0, 2], seed=1,
                   clusters=name == "twinv2")
    y = m(b)
    assert y.shape == (4,) and y.dtype == torch.float32 and torch.isfinite(y).all()
    torch.nn.functional.binary_cross_entropy_with_logits(y, b["label"]).backward()
    for n, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    idx, valid = m.retrieve(b)
    assert idx.dtype == torch.int64 and valid.dtype == torch.bool and idx.shape == valid.shape
    assert idx.shape[1] == min(m.topk, L) and not valid[1].any() and not valid[3].any()


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(MODEL_NAMES), lens=st.lists(st.integers(0, 12), min_size=1, max_size=4),
       short=st.integers(0, 6), extra=st.integers(1, 9), seed=st.integers(0, 10))
def test_outputs_invariant_to_padding_length(name, lens, short, extra, seed):
    m = MODELS[name]
    L = max(12, max(lens))
    b = make_batch(B=len(lens), L=L, long_lens=lens, short_lens=[short] * len(lens), seed=seed,
                   clusters=name == "twinv2")
    longer = pad_to(pad_to(b, "long", L + extra), "short", 6 + extra)
    with torch.no_grad():
        assert torch.allclose(m(b), m(longer), atol=1e-5)
        (i1, v1), (i2, v2) = m.retrieve(b), m.retrieve(longer)
    got1 = [sorted(i[v].tolist()) for i, v in zip(i1, v1)]
    got2 = [sorted(i[v].tolist()) for i, v in zip(i2, v2)]
    assert got1 == got2


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(["twinv2", "twin", "twin_full", "eta", "sim_soft"]),
       lens=st.lists(st.integers(0, 20), min_size=1, max_size=4), seed=st.integers(0, 10))
def test_padding_never_retrieved_when_enough_real_items(name, lens, seed):
    m = MODELS[name]
    b = make_batch(B=len(lens), L=20, long_lens=lens, seed=seed, clusters=name == "twinv2")
    idx, valid = m.retrieve(b)
    mask = b["long"]["mask"]
    for r, n in enumerate(lens):
        picked = mask[r, idx[r]]
        assert torch.equal(valid[r], picked)                 # valid marks exactly the real positions
        assert int(picked.sum()) == min(n, m.topk)           # all real ones when fewer than k exist
        assert len(set(idx[r].tolist())) == idx.shape[1]      # no position twice


# ---------------------------------------------------------------- baselines vs naive references

def _naive_topk(keys, k):
    """keys: list of (sort key tuple, position) for eligible real positions -> first k positions."""
    return [pos for _, pos in sorted(keys)[:k]]


def _selected(idx, valid, r):
    return [int(i) for i, v in zip(idx[r], valid[r]) if v]


@pytest.mark.parametrize("seed", range(3))
def test_sim_hard_retrieves_category_matches_most_recent_first(seed):
    m = MODELS["sim_hard"]
    b = make_batch(B=6, L=20, long_lens=[20, 15, 0, 7, 20, 3], seed=seed)
    idx, valid = m.retrieve(b)
    long, tgt = b["long"], b["target"]
    for r in range(6):
        keys = [((int(long["cross"][r, i, 2]), i), i) for i in range(20)
                if long["mask"][r, i] and long["category"][r, i] == tgt["category"][r]]
        assert _selected(idx, valid, r) == _naive_topk(keys, m.topk)


@pytest.mark.parametrize("seed", range(3))
def test_eta_retrieves_hamming_topk(seed):
    m = MODELS["eta"]
    b = make_batch(B=5, L=20, long_lens=[20, 11, 0, 4, 19], seed=seed)
    idx, valid = m.retrieve(b)
    with torch.no_grad():
        q = m.features.inherent(b["target"])
        k = m.features.inherent(b["long"])
    P = m.planes
    for r in range(5):
        hq = [float(q[r] @ P[:, j]) > 0 for j in range(m.bits)]
        keys = []
        for i in range(20):
            if b["long"]["mask"][r, i]:
                hk = [float(k[r, i] @ P[:, j]) > 0 for j in range(m.bits)]
                keys.append(((sum(x != y for x, y in zip(hk, hq)), i), i))
        assert _selected(idx, valid, r) == _naive_topk(keys, m.topk)


@pytest.mark.parametrize("seed", range(3))
def test_sdim_bucket_collisions_and_pooling_match_naive(seed):
    m = MODELS["sdim"]
    b = make_batch(B=5, L=20, long_lens=[20, 9, 0, 4, 17], seed=seed)
    idx, valid = m.retrieve(b)
    with torch.no_grad():
        q = m.features.inherent(b["target"])
        kh = m.features.inherent(b["long"])
        full = torch.cat([kh, m.features.cross_emb(b["long"]).flatten(-2)], -1)
        out = m.long_interest(q, b)
    P = m.planes

    def codes(x):
        bits = [float(x @ P[:, j]) > 0 for j in range(m.m * m.tau)]
        return [tuple(bits[h * m.tau:(h + 1) * m.tau]) for h in range(m.m)]

    for r in range(5):
        cq = codes(q[r])
        count, pooled = {}, torch.zeros(full.shape[-1])
        for h in range(m.m):
            s = torch.zeros(full.shape[-1])
            for i in range(20):
                if b["long"]["mask"][r, i] and codes(kh[r, i])[h] == cq[h]:
                    count[i] = count.get(i, 0) + 1
                    s = s + full[r, i]
            pooled += s / max(float(s.norm()), 1e-6)
        assert torch.allclose(out[r], pooled / m.m, atol=1e-5)
        keys = [((-n, i), i) for i, n in count.items()]
        assert _selected(idx, valid, r) == _naive_topk(keys, m.topk)


def test_sim_soft_retrieves_by_inner_product_of_its_own_embeddings():
    m = MODELS["sim_soft"]
    b = make_batch(B=4, L=20, long_lens=[20, 12, 0, 6], seed=3)
    idx, valid = m.retrieve(b)
    E = m.soft.weight.detach()
    for r in range(4):
        q = E[b["target"]["item"][r]]
        keys = [((-float(E[b["long"]["item"][r, i]] @ q), i), i) for i in range(20) if b["long"]["mask"][r, i]]
        assert _selected(idx, valid, r) == _naive_topk(keys, m.topk)
    y = m.train()(b)                                          # the soft embeddings get a gradient
    y.sum().backward()
    assert m.soft.weight.grad.abs().sum() > 0


def test_din_and_avg_pool_match_per_sample_loops():
    b = make_batch(B=3, L=12, long_lens=[12, 5, 0], seed=4)
    din, avg = MODELS["din"], MODELS["avg_pool"]
    with torch.no_grad():
        q = din.features.inherent(b["target"])
        out_d = din.long_interest(q, b)
        out_a = avg.long_interest(avg.features.inherent(b["target"]), b)
        for r in range(3):
            ref_d = torch.zeros(out_d.shape[1])
            ref_a, n = torch.zeros(out_a.shape[1]), 0
            for i in range(12):
                if not b["long"]["mask"][r, i]:
                    continue
                one = {k: v[r:r + 1, i:i + 1] for k, v in b["long"].items()}
                kh = din.features.inherent(one)[0, 0]
                kc = din.features.cross_emb(one)[0, 0].flatten()
                a = din.activation(torch.cat([kh, q[r], kh - q[r], kh * q[r]]))
                ref_d += a * din.w_v(torch.cat([kh, kc]))
                ref_a += torch.cat([avg.features.inherent(one)[0, 0], avg.features.cross_emb(one)[0, 0].flatten()])
                n += 1
            assert torch.allclose(out_d[r], ref_d, atol=1e-5)
            assert torch.allclose(out_a[r], ref_a / max(n, 1), atol=1e-6)


# ---------------------------------------------------------------- errors and precision

def test_clear_errors_for_bad_names_params_and_batches():
    with pytest.raises(ValueError, match="unknown model 'twin3'"):
        build_model("twin3", VOCAB, SMALL)
    with pytest.raises(ValueError, match="lacks \\['topk'\\]"):
        build_model("twin", VOCAB, {k: v for k, v in SMALL.items() if k != "topk"})
    with pytest.raises(ValueError, match="vocab\\['cross'\\]"):
        build_model("twin", {**VOCAB, "cross": []}, SMALL)
    m = MODELS["twin"]
    b = make_batch(B=2, L=20, seed=0)
    bad = make_batch(B=2, L=20, seed=0)
    bad["long"]["cross"] = bad["long"]["cross"][..., :2]
    with pytest.raises(ValueError, match=r"batch\['long'\]\['cross'\] has shape \(2, 20, 2\), expected \(2, 20, 3\)"):
        m(bad)
    bad = make_batch(B=2, L=20, seed=0)
    bad["long"]["item"][0, 0] = VOCAB["item"]
    with pytest.raises(ValueError, match=r"batch\['long'\]\['item'\] holds ids in .*expected \[0, 60\)"):
        m(bad)
    bad = {k: v for k, v in b.items() if k != "short"}
    with pytest.raises(ValueError, match="batch lacks 'short'"):
        m(bad)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    """The CUDA path uses bf16 autocast; the same code must accept it (checked here on CPU)."""
    for name in MODEL_NAMES:
        m = MODELS[name]
        b = make_batch(B=3, L=m.long_len, long_lens=[m.long_len, 0, 4], seed=2, clusters=name == "twinv2")
        with torch.no_grad():
            ref = m(b)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(b)
        assert torch.isfinite(y.float()).all() and torch.allclose(y.float(), ref, atol=0.05), name
