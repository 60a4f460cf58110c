"""SDIM (Cao et al., CIKM 2022, "Sampling is all you need on modeling long-term user behaviors").

m = `sdim_hashes` SimHash functions of tau = `sdim_width` bits each, on the item-inherent embeddings K_h.
Behaviour i collides with the target under hash h when all tau bits agree. For each hash, the embeddings
K_i = [K_h,i, K_c,i] of the colliding behaviours are summed and L2-normalised; the long-term interest is
the mean over the m hashes:
  u = (1/m) sum_h  s_h / max(||s_h||, eps),   s_h = sum_i m_i [code_h(K_h,i) == code_h(q)] K_i     (B, d_h + J*c)
No top-k, no attention weights: collision probability approximates the attention (Charikar's SimHash).
`retrieve` reports the k behaviours with the most collisions (at least one; ties: earlier position).
"""
from __future__ import annotations

import torch

from twinv2.models.base import CTRModel, stable_topk


class SDIM(CTRModel):
    name = "sdim"

    def __init__(self, vocab: dict, p: dict):
        super().__init__(vocab, p, p["twin_window"])
        self.m, self.tau = int(p["sdim_hashes"]), int(p["sdim_width"])
        g = torch.Generator().manual_seed(int(p.get("hash_seed", 0)))
        self.register_buffer("planes", torch.randn(self.features.d_h, self.m * self.tau, generator=g))
        f = self.features
        self._make_head(p, f.d_h + f.n_cross * f.cross_dim)

    def collisions(self, q_kh, long) -> torch.Tensor:
        """(B, L, m) bool: behaviour i lands in the target's bucket under hash h."""
        hq = (q_kh.float() @ self.planes.float() > 0).view(-1, 1, self.m, self.tau)               # (B, 1, m, tau)
        kh = self.features.inherent(long)
        hk = (kh.float() @ self.planes.float() > 0).view(*kh.shape[:2], self.m, self.tau)         # (B, L, m, tau)
        return (hk == hq).all(-1) & long["mask"].unsqueeze(-1)

    def long_interest(self, q_kh, batch):
        long = batch["long"]
        k = torch.cat([self.features.inherent(long), self.features.cross_emb(long).flatten(-2)], -1)
        with torch.no_grad():
            c = self.collisions(q_kh, long)                                               # (B, L, m)
        s = torch.einsum("blm,bld->bmd", c.to(k.dtype), k)                                # (B, m, d)
        s = s / s.float().norm(dim=-1, keepdim=True).clamp_min(1e-6).to(s.dtype)
        return s.mean(1)                                                                  # (B, d)

    @torch.no_grad()
    def retrieve(self, batch):
        long = batch["long"]
        q = self.features.inherent(batch["target"])
        n = self.collisions(q, long).sum(-1)                                               # (B, L)
        idx = stable_topk(n.masked_fill(~long["mask"], -1), self.topk)                    # (B, k)
        return idx, torch.gather(long["mask"] & (n > 0), 1, idx)
