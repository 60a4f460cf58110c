"""What every model shares: features, short-term target attention, the MLP head and the contract.

    logit = MLP([K_h(target), short(target, last S raw behaviours), long(target, long sequence)])

Subclasses implement `long_interest(q_kh, batch) -> (B, long_dim)` and `retrieve(batch)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from twinv2.models.attention import TwinAttention
from twinv2.models.layers import MLP, Features, check_batch, first_positions, gather_seq


class CTRModel(nn.Module):
    name = "base"
    long_source = "raw"            # "raw" | "clusters" | "none"

    def __init__(self, vocab: dict, p: dict, long_len: int):
        super().__init__()
        self.vocab = {k: (list(map(int, v)) if k == "cross" else int(v)) for k, v in vocab.items()}
        self.long_len = int(long_len)
        self.short_len = int(p["short_len"])
        self.topk = int(p["topk"])
        self.features = Features(vocab, p["embed_dim"], p["side_dim"], p["cross_dim"],
                                 float(p.get("embed_init_std", 0.1)))
        f = self.features
        self.short = TwinAttention(f.d_h, f.n_cross, f.cross_dim, p["n_heads"], p["head_dim"])
        self.check_inputs = True

    def _make_head(self, p: dict, long_dim: int) -> None:
        self.head = MLP(self.features.d_h + self.short.out_dim + long_dim, list(p["mlp"]))

    def parts(self) -> tuple[str, ...]:
        return ("short",) if self.long_source == "none" else ("short", "long")

    def long_interest(self, q_kh: torch.Tensor, batch: dict) -> torch.Tensor:
        """Target K_h (B, d_h) and the batch -> long-term interest (B, long_dim)."""
        raise NotImplementedError

    def forward(self, batch: dict) -> torch.Tensor:
        """batch (docs/architecture.md) -> logits (B,)."""
        if self.check_inputs:
            check_batch(batch, self.vocab, self.parts())
        q = self.features.inherent(batch["target"])                      # (B, d_h)
        s = self.short.attend(q, batch["short"], self.features)          # (B, H*dk)
        x = [q, s]
        if self.long_source != "none":
            x.append(self.long_interest(q, batch))               # (B, long_dim)
        return self.head(torch.cat([t.to(s.dtype) for t in x], dim=-1))

    def retrieve(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of the long sequence the model reads -> idx (B, k) int64, valid (B, k) bool.
        Default (no GSU): the whole long sequence capped at k."""
        return first_positions(batch["long"], self.topk)

    # ------------------------------------------------------------------ serving helpers
    def attention_modules(self) -> list[TwinAttention]:
        return [m for m in self.modules() if isinstance(m, TwinAttention)]

    @torch.no_grad()
    def build_item_cache(self) -> None:
        """Precompute K_h W^h (and the value/cross parts) for every id once; forward then gathers them.
        Valid until the weights change: switching to train mode drops the cache."""
        for m in self.attention_modules():
            m.build_cache(self.features)

    def clear_item_cache(self) -> None:
        for m in self.attention_modules():
            m.clear_cache()

    def train(self, mode: bool = True):
        if mode:
            self.clear_item_cache()
        return super().train(mode)

    @torch.no_grad()
    def item_embedding_table(self) -> torch.Tensor:
        """The item-id embedding table (n_items + 1, embed_dim), row 0 = padding, for clustering."""
        return self.features.item.weight.detach().float().cpu().clone()


class TwoStage(CTRModel):
    """SIM / ETA / SDIM-style retrieval: a GSU of the model's own kind picks k positions, then the same
    multi-head target attention ESU as TWIN reads them (without sharing the GSU's parameters).

    Subclasses define `gsu_key(q_kh, batch) -> key (B, L) int64 or float, eligible (B, L) bool`:
    larger keys are retrieved first (ties: the earlier position), ineligible real behaviours are
    never read by the ESU (e.g. SIM Hard's other categories)."""

    extra_dim = 0

    def __init__(self, vocab: dict, p: dict, long_len: int):
        super().__init__(vocab, p, long_len)
        f = self.features
        self.long_attn = TwinAttention(f.d_h, f.n_cross, f.cross_dim, p["n_heads"], p["head_dim"])

    def gsu_key(self, q_kh: torch.Tensor, batch: dict):
        raise NotImplementedError

    def _select(self, q_kh, batch):
        long = batch["long"]
        with torch.no_grad():
            key, eligible = self.gsu_key(q_kh, batch)
            low = float("-inf") if key.is_floating_point() else torch.iinfo(key.dtype).min
            key = key.masked_fill(~long["mask"], low)
            idx = stable_topk(key, self.topk)                                 # (B, k)
            valid = torch.gather(long["mask"] & eligible, 1, idx)
        return idx, valid

    def retrieve(self, batch: dict):
        return self._select(self.features.inherent(batch["target"]), batch)

    def long_interest(self, q_kh, batch):
        idx, valid = self._select(q_kh, batch)
        top = gather_seq(batch["long"], idx)
        top["mask"] = valid
        return self.long_attn.attend(q_kh, top, self.features)               # (B, H*dk)


def stable_topk(key: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k' = min(k, L) largest keys per row (B, L) -> (B, k'); ties: earlier position first
    (a stable sort, so retrieval is deterministic and does not depend on the padding length)."""
    return torch.sort(key, dim=1, descending=True, stable=True).indices[:, : min(k, key.shape[1])]
