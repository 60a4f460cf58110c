"""TWIN (Chang et al., KDD 2023): GSU top-k by TWIN's attention score, ESU on those k, one module.

long = the most recent `twin_window` raw behaviours ("twin") or the whole raw history up to
`twin_full_len` ("twin_full"). The GSU ranks without gradient; the ESU recomputes the same scores with
the same parameters on the k selected behaviours, so the loss trains W^h, W^q, W^c and beta.
"""
from __future__ import annotations

import torch

from twinv2.models.base import CTRModel
from twinv2.models.layers import gather_seq, is_broadcast


class TWIN(CTRModel):
    name = "twin"
    long_source = "raw"
    use_log_n = False

    def __init__(self, vocab: dict, p: dict, long_len: int | None = None):
        super().__init__(vocab, p, p["twin_window"] if long_len is None else long_len)
        self.long_attn = self.attention(p, use_log_n=self.log_n_switch(p))
        self._make_head(p, self.long_attn.out_dim)

    def log_n_switch(self, p: dict) -> bool:
        """Whether alpha' adds ln n (cluster size): the class's `use_log_n` (TWIN: never)."""
        return self.use_log_n

    def long_interest(self, q_kh: torch.Tensor, batch: dict) -> torch.Tensor:
        long = batch["long"]
        if not torch.is_grad_enabled() and is_broadcast(long):              # one user, many candidates
            return self.long_attn.gsu_esu_shared(q_kh, long, self.features, self.topk, batch["target"])
        idx, _ = self.long_attn.gsu(q_kh, long, self.features, self.topk, batch["target"])   # GSU (B, k)
        top = gather_seq(long, idx)                                         # (B, k, ...)
        return self.long_attn.attend(q_kh, top, self.features, batch["target"])   # ESU (B, out_dim)

    def retrieve(self, batch: dict):
        q = self.features.inherent(batch["target"])
        return self.long_attn.gsu(q, batch["long"], self.features, self.topk, batch["target"])


class TWINFull(TWIN):
    """TWIN whose GSU reads the whole raw life-cycle history (as long as memory allows)."""

    name = "twin_full"

    def __init__(self, vocab: dict, p: dict):
        super().__init__(vocab, p, long_len=p["twin_full_len"])
