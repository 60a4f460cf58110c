"""ETA (Chen et al., 2021, "End-to-end user behavior retrieval"): SimHash LSH retrieval.

The item-inherent embeddings K_h of the target and of every behaviour are hashed to `eta_bits` bits by
fixed random hyperplanes R (d_h, bits): h(x) = [x R > 0]. The GSU keeps the k behaviours with the smallest
Hamming distance to the target (ties: earlier position), the ESU is multi-head target attention on them.
  key_i = -hamming(h(K_h,i), h(q))
"""
from __future__ import annotations

import torch

from twinv2.models.base import TwoStage


def simhash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """(..., d) x (d, bits) -> (..., bits) bool sign bits."""
    return (x.float() @ planes.float()) > 0


class ETA(TwoStage):
    name = "eta"

    def __init__(self, vocab: dict, p: dict):
        super().__init__(vocab, p, p["twin_window"])
        self.bits = int(p["eta_bits"])
        g = torch.Generator().manual_seed(int(p.get("hash_seed", 0)))
        self.register_buffer("planes", torch.randn(self.features.d_h, self.bits, generator=g))
        self._make_head(p, self.long_attn.out_dim)

    def hamming(self, q_kh, batch) -> torch.Tensor:
        hq = simhash(q_kh, self.planes)                                           # (B, bits)
        hk = simhash(self.features.inherent(batch["long"]), self.planes)          # (B, L, bits)
        return (hk != hq.unsqueeze(1)).sum(-1)                                    # (B, L)

    def gsu_key(self, q_kh, batch):
        return -self.hamming(q_kh, batch), torch.ones_like(batch["long"]["mask"])
