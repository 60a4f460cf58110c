"""Avg-Pooling: the long-term interest is the masked mean of the behaviours' embeddings.

long_interest = sum_i m_i [K_h,i, K_c,i] / max(1, sum_i m_i)        (B, d_h + J*c); no GSU.
"""
from __future__ import annotations

import torch

from twinv2.models.base import CTRModel


class AvgPool(CTRModel):
    name = "avg_pool"
    long_source = "raw"

    def __init__(self, vocab: dict, p: dict):
        super().__init__(vocab, p, p["twin_window"])
        f = self.features
        self._make_head(p, f.d_h + f.n_cross * f.cross_dim)

    def long_interest(self, q_kh, batch):
        long = batch["long"]
        k = torch.cat([self.features.inherent(long), self.features.cross_emb(long).flatten(-2)], -1)
        m = long["mask"].unsqueeze(-1).to(k.dtype)                       # (B, L, 1)
        return (k * m).sum(1) / m.sum(1).clamp_min(1.0)                   # (B, d_h + J*c)
