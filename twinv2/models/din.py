"""DIN (Zhou et al., KDD 2018): target attention on the most recent `din_len` raw behaviours.

Activation unit: a_i = MLP([k_i, q, k_i - q, k_i * q]) (ReLU hidden layers, scalar out) on item-inherent
embeddings k_i = K_h,i, q = K_h(target); no softmax (DIN keeps the intensity):
long_interest = sum_i m_i a_i [K_h,i, K_c,i] W^v            (B, H*dk)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from twinv2.models.base import CTRModel


class DIN(CTRModel):
    name = "din"
    long_source = "raw"

    def __init__(self, vocab: dict, p: dict):
        super().__init__(vocab, p, p["din_len"])
        f = self.features
        layers, d = [], 4 * f.d_h
        for h in p["din_att_mlp"]:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, 1))
        self.activation = nn.Sequential(*layers)
        self.w_v = nn.Linear(f.d_h + f.n_cross * f.cross_dim, p["n_heads"] * p["head_dim"], bias=False)
        self._make_head(p, p["n_heads"] * p["head_dim"])

    def long_interest(self, q_kh, batch):
        long = batch["long"]
        k = self.features.inherent(long)                                  # (B, L, d_h)
        q = q_kh.unsqueeze(1).expand_as(k)
        a = self.activation(torch.cat([k, q, k - q, k * q], -1))          # (B, L, 1)
        a = a * long["mask"].unsqueeze(-1)
        v = self.w_v(torch.cat([k, self.features.cross_emb(long).flatten(-2)], -1))  # (B, L, H*dk)
        return (a.to(v.dtype) * v).sum(1)
