"""Small random batches that follow the batch contract (docs/architecture.md "Model input")."""
from __future__ import annotations

import pytest
import torch

VOCAB = {"item": 60, "author": 12, "category": 6, "dur_bucket": 5, "cross": [7, 9, 11]}

SMALL = {"embed_dim": 8, "side_dim": 4, "cross_dim": 4, "n_heads": 2, "head_dim": 4, "topk": 5,
         "short_len": 6, "twin_window": 20, "twin_full_len": 40, "din_len": 12, "din_att_mlp": [8],
         "mlp": [16, 8], "sim_soft_dim": 4, "eta_bits": 16, "sdim_hashes": 3, "sdim_width": 2, "hash_seed": 0}


def item_table(vocab=VOCAB, seed=0):
    """A consistent item -> (author, category, dur_bucket) table (row 0 = padding)."""
    g = torch.Generator().manual_seed(seed)
    n = vocab["item"]
    t = {k: torch.randint(1, vocab[k], (n,), generator=g) for k in ("author", "category", "dur_bucket")}
    for x in t.values():
        x[0] = 0
    return t


def make_seq(B, L, lens, vocab=VOCAB, g=None, clusters=False):
    """A (B, L) sequence dict whose row b has lens[b] real behaviours, left-aligned, padded at the end."""
    tab = item_table(vocab)
    lens = torch.as_tensor(lens)
    mask = torch.arange(L).unsqueeze(0) < lens.unsqueeze(1)
    item = torch.randint(1, vocab["item"], (B, L), generator=g) * mask
    seq = {k: tab[k][item] for k in ("author", "category", "dur_bucket")}
    seq["item"] = item
    seq["cross"] = torch.stack([torch.randint(1, n, (B, L), generator=g) for n in vocab["cross"]], -1) * mask[..., None]
    seq["mask"] = mask
    n = torch.randint(1, 30, (B, L), generator=g) if clusters else torch.ones(B, L, dtype=torch.long)
    seq["log_n"] = torch.log(n.float()) * mask
    return seq


def make_batch(B=4, L=20, S=6, long_lens=None, short_lens=None, vocab=VOCAB, seed=0, clusters=False):
    g = torch.Generator().manual_seed(seed)
    tab = item_table(vocab)
    item = torch.randint(1, vocab["item"], (B,), generator=g)
    target = {"item": item, **{k: tab[k][item] for k in ("author", "category", "dur_bucket")}}
    long_lens = [L] * B if long_lens is None else long_lens
    short_lens = [S] * B if short_lens is None else short_lens
    return {"target": target,
            "long": make_seq(B, L, long_lens, vocab, g, clusters),
            "short": make_seq(B, S, short_lens, vocab, g),
            "label": torch.randint(0, 2, (B,), generator=g).float(),
            "user": torch.arange(B)}


def pad_to(batch, part, L):
    """The same batch with batch[part] padded at the end to length L (mask False, ids 0)."""
    out = {k: v for k, v in batch.items()}
    seq = batch[part]
    cur = seq["mask"].shape[1]
    new = {}
    for k, x in seq.items():
        pad = torch.zeros((x.shape[0], L - cur) + x.shape[2:], dtype=x.dtype)
        new[k] = torch.cat([x, pad], 1)
    out[part] = new
    return out


@pytest.fixture()
def small_params():
    return dict(SMALL)
