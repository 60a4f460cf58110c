"""What every model shares: features, short-term target attention, the MLP head and the contract.

    logit = MLP([K_h(target), short(target, last S raw behaviours), long(target, long sequence)])

Subclasses implement `long_interest(q_kh, batch) -> (B, long_dim)` and `retrieve(batch)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from twinv2.models.attention import TwinAttention
from twinv2.models.layers import MLP, Embedding, Features, PeriodicEmbedding, check_batch, first_positions, gather_seq


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
        self.short = self.attention(p)
        # "other features" of the head (TWIN-V2 sec. 3.4): the target's popularity bucket (views before ts)
        self.pop = Embedding(int(vocab.get("pop", 22)), p["side_dim"]) if p.get("target_pop") else None
        self.count_fields = tuple(p.get("match_counts") or ())
        # match_recency: per part, how long ago the target's category / author / item was last read (match_recency())
        self.recency_fields = tuple(p.get("match_counts") or ()) if p.get("match_recency") else ()
        # the target's views and mean completion before ts, and its author's (target["stats"], 4 numbers)
        self.target_stats = bool(p.get("target_stats", False))
        # the user's earlier train labels: ln(1 + n), (k + p0) / (n + 1) (target["feedback"], twinv2.training.feedback)
        self.user_feedback = bool(p.get("user_feedback", False))
        # a learned scalar per target item added to the logit (the "wide" item bias of CTR models), init 0
        self.item_bias = Embedding(vocab["item"], 1, padding_idx=0) if p.get("item_bias") else None
        # the same for the target's author (a scalar per author: the author's quality, outside the attention)
        self.author_bias = Embedding(vocab["author"], 1, padding_idx=0) if p.get("author_bias") else None
        # a learned scalar per user (the user's base rate, which the behaviours need not show), the user id hashed
        # into `user_bias_buckets` rows: row 1 + (user_id mod (buckets - 1)); row 0 = no user
        self.user_buckets = int(p.get("user_bias_buckets", 65_536))
        if p.get("user_bias") and self.user_buckets < 2:
            raise ValueError(f"params model.user_bias_buckets must be >= 2, got {self.user_buckets}")
        self.user_bias = Embedding(self.user_buckets, 1, padding_idx=0) if p.get("user_bias") else None
        for b in (self.item_bias, self.author_bias, self.user_bias):
            if b is not None:
                nn.init.zeros_(b.weight)
        self.watermark_gap = bool(p.get("watermark_gap", False)) and self.long_source == "clusters"
        # virtual_mix J: the long part's match counts read every cluster's J most frequent member ids per field,
        # over the user's whole life cycle (batch["life"], samples.LifeCounts)
        self.mix_slots = int(p.get("virtual_mix", 0) or 0) if self.long_source == "clusters" else 0
        # cluster_order: which clusters the long sequence keeps when a user has more than long_len (World.dataset):
        # time = the newest (the paper's order), size = the largest (ln n ascending, so the gap rows push out the
        # smallest first)
        self.cluster_order = str(p.get("cluster_order", "time"))
        if self.cluster_order not in ("time", "size"):
            raise ValueError(f"params model.cluster_order must be time or size, got {self.cluster_order!r}")
        # numeric_embed k: every scalar head input (target stats, feedback, match counts) also enters the head as a
        # periodic embedding (layers.PeriodicEmbedding, k frequencies -> numeric_dim dims each); 0: raw values only
        self.numeric_k = int(p.get("numeric_embed", 0) or 0)
        self.numeric = None
        self.check_inputs = True

    def attention(self, p: dict, use_log_n: bool = False) -> TwinAttention:
        """A TWIN target-attention module with the model's shared options."""
        f = self.features
        return TwinAttention(f.d_h, f.n_cross, f.cross_dim, p["n_heads"], p["head_dim"], use_log_n=use_log_n,
                             mass=bool(p.get("match_mass", False)),
                             match_fields=tuple(p.get("target_match") or ()))

    def _make_head(self, p: dict, long_dim: int) -> None:
        other = self.pop.embedding_dim if self.pop is not None else 0
        if self.count_fields:
            if self.mix_slots and tuple(self.count_fields) != ("category", "author", "item"):
                raise ValueError(f"model.virtual_mix counts category, author and item; model.match_counts is "
                                 f"{list(self.count_fields)}: set it to [category, author, item] or virtual_mix: 0")
        n_scalar = len(self.parts()) * (4 * len(self.count_fields) + 2) if self.count_fields else 0
        n_scalar += (4 if self.target_stats else 0) + (2 if self.user_feedback else 0)
        n_scalar += len(self.parts()) * (len(self.recency_fields) + 1) if self.recency_fields else 0
        other += n_scalar
        if self.numeric_k and n_scalar:
            d = int(p.get("numeric_dim", 8))
            self.numeric = PeriodicEmbedding(n_scalar, self.numeric_k, d, float(p.get("numeric_sigma", 1.0)))
            other += n_scalar * d
        self.head = MLP(self.features.d_h + self.short.out_dim + long_dim + other, list(p["mlp"]))

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
        s = self.short.attend(q, batch["short"], self.features, batch["target"])         # (B, H*dk)
        x = [q, s]
        if self.long_source != "none":
            x.append(self.long_interest(q, batch))               # (B, long_dim)
        if self.pop is not None:
            x.append(self.pop(batch["target"]["pop"]))           # (B, side_dim)
        scalars = []                                             # the head's scalar inputs, (B, n_scalar) in all
        if self.target_stats:
            scalars.append(batch["target"]["stats"])             # (B, 4)
        if self.user_feedback:
            if "feedback" not in batch["target"]:
                raise ValueError("batch['target'] lacks 'feedback' (B, 2): this model has model.user_feedback on "
                                 "(samples built by World.samples carry it)")
            scalars.append(batch["target"]["feedback"])          # (B, 2)
        for part in self.parts() if self.count_fields else ():
            if part == "long" and self.mix_slots:                   # whole life cycle (virtual_mix)
                if "life" not in batch:
                    raise ValueError("batch lacks 'life' (B, 14): this model has virtual_mix > 0 and counts its "
                                     "long part over the whole life cycle (samples.SampleSet.life_counts)")
                scalars.append(batch["life"])                        # (B, 4F+2), F = MIX_FIELDS
            else:
                scalars.append(match_counts(batch[part], batch["target"], self.count_fields))   # (B, 4F+2)
        for part in self.parts() if self.recency_fields else ():
            scalars.append(match_recency(batch[part], batch["target"], self.recency_fields,
                                         self.vocab["cross"][2]))                                # (B, F+1)
        x += scalars
        if self.numeric is not None:
            x.append(self.numeric(torch.cat([t.float() for t in scalars], dim=-1)))   # (B, n_scalar * numeric_dim)
        logit = self.head(torch.cat([t.to(s.dtype) for t in x], dim=-1))
        if self.item_bias is not None:
            logit = logit + self.item_bias(batch["target"]["item"]).squeeze(-1).to(logit.dtype)
        if self.author_bias is not None:
            logit = logit + self.author_bias(batch["target"]["author"]).squeeze(-1).to(logit.dtype)
        if self.user_bias is not None:
            logit = logit + self.user_bias(self.user_row(batch)).squeeze(-1).to(logit.dtype)
        return logit

    def user_row(self, batch: dict) -> torch.Tensor:
        """Row of the user-bias table of each sample: 1 + (user_id mod (buckets - 1)); (B,) int64."""
        if "user" not in batch:
            raise ValueError("batch lacks 'user' (B,) user ids: this model has model.user_bias on")
        u = batch["user"].to(batch["target"]["item"].device).long()
        return 1 + torch.remainder(u, self.user_buckets - 1)

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


def target_matches(seq: dict, target: dict, fields: tuple[str, ...]) -> torch.Tensor:
    """m_if = [id_if == id_qf]: (B, L, F) bool, row i of the sequence against the target, per field f."""
    return torch.stack([(seq[f] == target[f].unsqueeze(1)) for f in fields], dim=-1)


def match_counts(seq: dict, target: dict, fields: tuple[str, ...]) -> torch.Tensor:
    """How much of a sequence matches the target, parameter-free (docs/models.md, match_counts). Over the rows
    the model reads, n_i = exp(log_n) (cluster size for TWIN-V2's clusters, 1 for a raw behaviour, 0 for
    padding), c_i = completion (seq["comp"], 1 where absent), m_if = [id_if == id_qf]:

        N = sum n_i,        C_f = sum n_i m_if          -> ln(1 + C_f), C_f / N     (F each)   ln(1 + N)
        P = sum n_i c_i,    D_f = sum n_i c_i m_if      -> ln(1 + D_f), D_f / P     (F each)   P / N

    -> (B, 4F + 2). For clusters a row counts with its virtual item's ids and the members' mean completion.
    (With virtual_mix, TWIN-V2's long part is counted over the whole life cycle instead: batch["life"],
    samples.LifeCounts, the same 4F + 2 numbers over every cluster's member id mix plus the gap rows.)"""
    n = seq["log_n"].float().exp() * seq["mask"]                                        # (B, L)
    c = seq["comp"].float() if "comp" in seq else torch.ones_like(n)
    m = target_matches(seq, target, fields).float()                                      # (B, L, F)
    out = []
    for w in (n, n * c):
        tot = w.sum(1, keepdim=True)                                                     # (B, 1)
        cnt = torch.einsum("bl,blf->bf", w, m)                                           # (B, F)
        out += [torch.log1p(cnt), cnt / tot.clamp_min(1e-6)]
    N, P = n.sum(1, keepdim=True), (n * c).sum(1, keepdim=True)
    out += [torch.log1p(N), P / N.clamp_min(1.0)]
    return torch.cat(out, dim=-1)


def match_recency(seq: dict, target: dict, fields: tuple[str, ...], n_gap: int) -> torch.Tensor:
    """How long ago the sequence last held the target's id of each field, parameter-free: over the rows read,
    g_i = the row's time-gap bucket (seq["cross"][..., 2] = 1 + floor(log2(1 + seconds before ts)), samples.Vocab;
    a cluster's gap is that of its ts), m_if = [id_if == id_qf]:

        R_f = min_i {g_i : m_if} / n_gap   (F each, 1 when no row matches)     R = min_i g_i / n_gap

    -> (B, F + 1) in (0, 1], n_gap = the gap vocabulary size (gap_log2_max + 2). The recency of the target's
    category in the user's history, as the gbdt anchor's cat_gap_log / item_gap_log / user_gap_log read it."""
    g = seq["cross"][..., 2].float()                                                       # (B, L)
    none = torch.full_like(g, float(n_gap))
    g = torch.where(seq["mask"], g, none)
    m = target_matches(seq, target, fields)                                                # (B, L, F)
    per_field = torch.where(m, g.unsqueeze(-1), none.unsqueeze(-1)).amin(1)                # (B, F)
    return torch.cat([per_field, g.amin(1, keepdim=True)], dim=-1) / float(n_gap)


class TwoStage(CTRModel):
    """SIM / ETA / SDIM-style retrieval: a GSU of the model's own kind picks k positions, then the same
    multi-head target attention ESU as TWIN reads them (without sharing the GSU's parameters).

    Subclasses define `gsu_key(q_kh, batch) -> key (B, L) int64 or float, eligible (B, L) bool`:
    larger keys are retrieved first (ties: the earlier position), ineligible real behaviours are
    never read by the ESU (e.g. SIM Hard's other categories)."""

    extra_dim = 0

    def __init__(self, vocab: dict, p: dict, long_len: int):
        super().__init__(vocab, p, long_len)
        self.long_attn = self.attention(p)

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
        return self.long_attn.attend(q_kh, top, self.features, batch["target"])   # (B, H*dk)


def stable_topk(key: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k' = min(k, L) largest keys per row (B, L) -> (B, k'); ties: earlier position first
    (a stable sort, so retrieval is deterministic and does not depend on the padding length)."""
    return torch.sort(key, dim=1, descending=True, stable=True).indices[:, : min(k, key.shape[1])]
