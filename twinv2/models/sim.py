"""SIM (Pi et al., CIKM 2020): search-based GSU over the most recent `twin_window` raw behaviours, then
the multi-head target-attention ESU on the top k.

SIM Hard: retrieve the behaviours whose category equals the target's. Among matches, the most recent
first (smallest log time-gap bucket, cross feature 2 of the contract), then the earlier position; other
categories are never read (valid = False), so a user without a match contributes nothing.
  key_i = match_i * G + (G - 1 - gap_i),   G = gap-bucket vocabulary size; ties: earlier position

SIM Soft: retrieve by the inner product of separate item embeddings e'_i . e'_q (sim_soft_dim), ties: earlier position.
As in SIM, the soft-search embeddings are trained by a pooled side input: u = sum_i softmax_i(e'_i . e'_q) e'_i
over all L behaviours joins the ESU output (long_dim = H*dk + sim_soft_dim); top-k is not differentiable.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from twinv2.models.base import TwoStage
from twinv2.models.layers import Embedding, masked_softmax

GAP = 2   # index of the log time-gap bucket among the cross features (docs/architecture.md)


class SIMHard(TwoStage):
    name = "sim_hard"

    def __init__(self, vocab: dict, p: dict):
        super().__init__(vocab, p, p["twin_window"])
        self._make_head(p, self.long_attn.out_dim)

    def gsu_key(self, q_kh, batch):
        long = batch["long"]
        match = long["category"] == batch["target"]["category"].unsqueeze(1)       # (B, L)
        if len(self.vocab["cross"]) > GAP:
            G, gap = self.vocab["cross"][GAP], long["cross"][..., GAP]
        else:
            G, gap = 1, torch.zeros_like(long["category"])
        key = match.long() * G + (G - 1 - gap)                                       # (B, L)
        return key, match


class SIMSoft(TwoStage):
    name = "sim_soft"

    def __init__(self, vocab: dict, p: dict):
        super().__init__(vocab, p, p["twin_window"])
        self.soft = Embedding(vocab["item"], p["sim_soft_dim"], padding_idx=0)
        nn.init.normal_(self.soft.weight, std=0.1)
        with torch.no_grad():
            self.soft.weight[0].zero_()
        self._make_head(p, self.long_attn.out_dim + p["sim_soft_dim"])

    def soft_scores(self, batch):
        e = self.soft(batch["long"]["item"])                                      # (B, L, m)
        q = self.soft(batch["target"]["item"])                                    # (B, m)
        return torch.einsum("blm,bm->bl", e, q).float(), e

    def gsu_key(self, q_kh, batch):
        r, _ = self.soft_scores(batch)
        return r, torch.ones_like(batch["long"]["mask"])

    def long_interest(self, q_kh, batch):
        esu = super().long_interest(q_kh, batch)                                  # (B, H*dk)
        r, e = self.soft_scores(batch)
        w = masked_softmax(r, batch["long"]["mask"], dim=1)                       # (B, L)
        u = torch.einsum("bl,blm->bm", w.to(e.dtype), e)                          # (B, m)
        return torch.cat([esu, u.to(esu.dtype)], dim=-1)
