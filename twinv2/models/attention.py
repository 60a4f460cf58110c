"""TWIN's consistency-preserving target attention (Chang et al., KDD 2023), with TWIN-V2's ln(n) term.

Per head h, for behaviour i of a sequence and the target q:

    alpha_ih = (K_h,i W^h_h) . (q W^q_h) / sqrt(d_k)  +  sum_j (K_c,ij . w_j) beta_hj  [+ ln n_i]

K_h,i is the item-inherent embedding (d_h), K_c,ij the embedding of cross feature j (c dims) and w_j its own
compression vector (TWIN's block-diagonal W^c), beta (H, J) learned. ln n_i (cluster size) only when the
sequence holds clusters (TWIN-V2): softmax then weighs a cluster exactly like n_i copies of its virtual item.

GSU: rank the whole sequence by the head-mean of alpha (no gradient), keep the top k.
ESU: multi-head target attention on those k, softmax_i(alpha_ih) (K_i W^v_h), heads concatenated.
Both stages are this one module, so they share every parameter.

Cache: W^h, W^v are linear and K_h is a concatenation of per-feature embeddings, so
K_h W^h = sum_f E_f[id_f] W^h_f. `build_cache` precomputes E_f W^h_f (and the value and cross parts) for every
id of every feature once, stacked in one table per kind; scoring then gathers rows and sums them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from twinv2.models.layers import INHERENT, Features, is_broadcast, masked_softmax


def top_k(g: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the k largest entries of each row of g (B, L), in no particular order. On the CPU a
    partial selection (numpy's introselect, ~3x torch.topk at B=500, L=350, k=50); torch.topk elsewhere.
    Between exactly equal scores either may be kept (as with torch.topk)."""
    L = g.shape[1]
    if k >= L:
        return torch.arange(L, device=g.device).expand(g.shape[0], L)
    if g.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.argpartition(g.detach().float().numpy(), L - k, axis=1)[:, L - k:])
    return torch.topk(g, k, dim=1, sorted=False).indices


class TwinAttention(nn.Module):
    def __init__(self, d_h: int, n_cross: int, cross_dim: int, n_heads: int, head_dim: int,
                 use_log_n: bool = False, mass: bool = False, match_fields: tuple[str, ...] = ()):
        super().__init__()
        self.d_h, self.J, self.c, self.H, self.dk = d_h, n_cross, cross_dim, n_heads, head_dim
        self.use_log_n = use_log_n
        self.mass = mass
        self.match_fields = tuple(match_fields)
        if self.match_fields:                                                          # target-match cross terms
            self.beta_m = nn.Parameter(torch.zeros(n_heads, len(self.match_fields)))
        self.w_h = nn.Linear(d_h, n_heads * head_dim, bias=False)                     # W^h
        self.w_q = nn.Linear(d_h, n_heads * head_dim, bias=False)                     # W^q
        self.w_c = nn.Parameter(torch.randn(n_cross, cross_dim) / math.sqrt(cross_dim))  # W^c (block-diag)
        self.beta = nn.Parameter(0.1 * torch.randn(n_heads, n_cross))                  # beta per head
        self.w_v = nn.Linear(d_h + n_cross * cross_dim, n_heads * head_dim, bias=False)  # W^v on [K_h, K_c]
        self.out_dim = n_heads * head_dim + (n_heads if mass else 0)
        self._cache: dict | None = None

    # ------------------------------------------------------------------ cache
    @torch.no_grad()
    def build_cache(self, features: Features) -> dict:
        """Precompute the per-id projections of every feature table (call after training, in eval mode).

        The tables are stacked so that a lookup is one gather per kind, not one per feature:
          key  (n_item + n_author + n_cat + n_dur, H*dk)          rows E_f[id] W^h_f
          val  (same rows, then every cross table's rows, H*dk)   rows E_f[id] W^v_f
          cross_s  (sum_j n_j,)                                    rows E_j[id] . w_j
        with `off_h` (4,) and `off_c` (J,) the first row of each feature."""
        keys, vals, off, rows = [], [], 0, []
        for name, emb in features.tables():
            d = emb.embedding_dim
            keys.append(emb.weight @ self.w_h.weight[:, off:off + d].T)            # (n_f, H*dk)
            vals.append(emb.weight @ self.w_v.weight[:, off:off + d].T)            # (n_f, H*dk)
            rows.append(emb.num_embeddings)
            off += d
        cross_s, cross_rows = [], []
        for j, emb in enumerate(features.cross):
            cols = slice(self.d_h + j * self.c, self.d_h + (j + 1) * self.c)
            cross_s.append(emb.weight @ self.w_c[j])                                # (n_j,)
            vals.append(emb.weight @ self.w_v.weight[:, cols].T)                    # (n_j, H*dk)
            cross_rows.append(emb.num_embeddings)
        dev = self.w_h.weight.device
        starts = lambda r: torch.tensor([0, *r[:-1]], device=dev).cumsum(0)       # noqa: E731
        self._cache = {"key": torch.cat(keys), "val": torch.cat(vals), "cross_s": torch.cat(cross_s),
                       "off_h": starts(rows), "off_c": starts(cross_rows), "n_h": sum(rows)}
        return self._cache

    def clear_cache(self) -> None:
        self._cache = None

    # ------------------------------------------------------------------ projections
    def project(self, seq: dict, features: Features, values: bool = True):
        """seq (B, L) index tensors -> keys K_h W^h (B, L, H, dk), cross scalars K_c W^c (B, L, J),
        values K W^v (B, L, H, dk) or None. Uses the cache when one is built.
        A sequence broadcast over the batch (stride 0: one user scored against many candidates) is
        projected once and the result broadcast."""
        B, L = seq["mask"].shape
        if is_broadcast(seq):
            one = {k: seq[k][:1] for k in ("item", "author", "category", "dur_bucket", "cross", "mask")}
            kp, cs, v = self.project(one, features, values)
            return (kp.expand(B, *kp.shape[1:]), cs.expand(B, *cs.shape[1:]),
                    None if v is None else v.expand(B, *v.shape[1:]))
        if self._cache is not None:
            ch = self._cache
            ih = torch.stack([seq[f] for f in INHERENT], dim=-1) + ch["off_h"]     # (B, L, 4) rows
            ic = seq["cross"] + ch["off_c"]                                         # (B, L, J) rows
            kp = ch["key"][ih].sum(-2)                                              # (B, L, H*dk)
            cs = ch["cross_s"][ic]                                                  # (B, L, J)
            v = ch["val"][torch.cat([ih, ic + ch["n_h"]], dim=-1)].sum(-2) if values else None
        else:
            kh = features.inherent(seq)                                   # (B, L, d_h)
            ce = features.cross_emb(seq)                                  # (B, L, J, c)
            kp = self.w_h(kh)                                             # (B, L, H*dk)
            cs = torch.einsum("bljc,jc->blj", ce, self.w_c.to(ce.dtype))  # (B, L, J)
            v = self.w_v(torch.cat([kh, ce.flatten(-2)], dim=-1)) if values else None
        kp = kp.view(B, L, self.H, self.dk)
        if v is not None:
            v = v.view(B, L, self.H, self.dk)
        return kp, cs, v

    def query(self, q_kh: torch.Tensor) -> torch.Tensor:
        """Target K_h (B, d_h) -> q W^q (B, H, dk)."""
        return self.w_q(q_kh).view(-1, self.H, self.dk)

    def target_match(self, seq: dict, target: dict | None) -> torch.Tensor | None:
        """Behaviour-target match indicators (B, L, F), 1.0 where the behaviour's id of field f equals the
        target's (F = len(match_fields)); None without match fields. Padding rows are 0."""
        if not self.match_fields:
            return None
        if target is None:
            raise ValueError(f"this attention scores target matches on {list(self.match_fields)}: pass target=")
        m = [(seq[f] == target[f].unsqueeze(1)) & seq["mask"] for f in self.match_fields]
        return torch.stack(m, dim=-1).float()

    def scores(self, qp, kp, cs, log_n, match=None) -> torch.Tensor:
        """alpha' (B, L, H) in float32 (padding not masked here); `match` (B, L, F) adds
        sum_f [id_if == id_qf] beta_m[h, f] (target_match)."""
        if kp.shape[0] > 1 and kp.stride(0) == 0:             # one sequence broadcast over candidates
            a = torch.einsum("lhd,bhd->blh", kp[0], qp).float() / math.sqrt(self.dk)
        else:
            a = torch.einsum("blhd,bhd->blh", kp, qp).float() / math.sqrt(self.dk)
        return self.row_terms(a, cs, log_n, match)

    def row_terms(self, a: torch.Tensor, cs, log_n, match=None) -> torch.Tensor:
        """alpha' = the dot part a (B, L, H) float32 + the cross terms sum_j (K_c,ij . w_j) beta_hj [+ the match
        terms sum_f match_if beta_m[h, f]] [+ ln n_i]."""
        if cs.shape[0] > 1 and cs.stride(0) == 0:             # one sequence broadcast over candidates
            a = a + torch.einsum("lj,hj->lh", cs[0].float(), self.beta.float()).unsqueeze(0)
        else:
            a = a + torch.einsum("blj,hj->blh", cs.float(), self.beta.float())
        if match is not None:
            a = a + torch.einsum("blf,hf->blh", match, self.beta_m.float())
        if self.use_log_n:
            a = a + log_n.float().unsqueeze(-1)
        return a

    # ------------------------------------------------------------------ GSU / ESU
    @torch.no_grad()
    def gsu(self, q_kh: torch.Tensor, seq: dict, features: Features, k: int, target: dict | None = None):
        """Top-k positions by the head-mean of alpha' -> idx (B, k') int64, valid (B, k') bool, k' = min(k, L).
        Padding scores -inf, so it is retrieved only when a row has fewer than k real behaviours."""
        a = self.gsu_scores(q_kh, seq, features, target).masked_fill(~seq["mask"], float("-inf"))   # (B, L)
        k = min(k, a.shape[1])
        idx = torch.topk(a, k, dim=1).indices                                  # (B, k)
        return idx, torch.gather(seq["mask"], 1, idx)

    @torch.no_grad()
    def gsu_scores(self, q_kh: torch.Tensor, seq: dict, features: Features, target: dict | None = None):
        """The GSU's ranking score, the head mean of alpha' (B, L) (padding not masked), without projecting the
        L rows: mean_h (K_h,l W^h_h) . (q W^q_h) / sqrt(d_k) = K_h,l . u / (H sqrt(d_k)) with u = (q W^q) W^h
        (B, d_h), one dot product per row instead of a (d_h x H*dk) projection of each of the B*L rows; the
        cross part reads per-id scalars E_j w_j (one small table per cross feature), the match terms and
        ln n add their head means. Equal to scores(...).mean(-1) (tests/models/test_attention.py)."""
        B, L = seq["mask"].shape
        u = self.query(q_kh).reshape(B, -1).float() @ self.w_h.weight.float()          # (B, d_h)
        g, off = None, 0
        for name, emb in features.tables():             # K_h . u table by table: no (B, L, d_h) concatenation
            d = emb.embedding_dim
            uf = u[:, off:off + d]                                                      # (B, d_f)
            off += d
            if emb.num_embeddings <= L:                 # a small table: its rows . u, then one gather
                part = (uf @ emb.weight.float().T).gather(1, seq[name])                # (B, n_f) -> (B, L)
            else:
                part = torch.bmm(emb(seq[name]).float(), uf.unsqueeze(-1)).squeeze(-1)  # (B, L)
            g = part if g is None else g + part
        g = g / (self.H * math.sqrt(self.dk))                                           # (B, L)
        beta = self.beta.float().mean(0)                                                # (J,)
        x = seq["cross"]
        for j, emb in enumerate(features.cross):
            g = g + (emb.weight.float() @ self.w_c[j].float())[x[..., j]] * beta[j]     # (B, L)
        match = self.target_match(seq, target)
        if match is not None:
            g = g + match @ self.beta_m.float().mean(0)
        if self.use_log_n:
            g = g + seq["log_n"].float()
        return g

    @torch.no_grad()
    def gsu_esu_shared(self, q_kh: torch.Tensor, seq: dict, features: Features, k: int,
                       target: dict | None = None) -> torch.Tensor:
        """GSU then ESU for ONE user's sequence broadcast over B candidates (serving, no gradient) -> (B, H*dk).

        The L rows are projected once (keys, cross scalars and values). alpha' of every (head, candidate, row)
        is H matmuls (H, B, dk) x (H, dk, L) plus a per-row constant (cross terms [+ ln n]); the GSU keeps the
        top k rows of its head mean (top_k: a partial selection, not a sort); the ESU's softmax runs over those
        k entries only, and its weights, scattered back into (H, B, L), meet the L values in H matmuls: nothing
        of size B*k*H*dk is gathered. With target_match terms (per candidate) the generic path runs. Same
        result as gsu() + gather_seq() + attend() (tests/models/test_attention.py), which re-projects because
        in training the ESU must carry gradients."""
        kp, cs, v = self.project(seq, features)                                # (B, L, H, dk) stride-0 views
        qp = self.query(q_kh)                                                  # (B, H, dk)
        B, L = seq["mask"].shape
        if target is not None and self.match_fields:                          # per-candidate match terms
            a = self.scores(qp, kp, cs, seq["log_n"], self.target_match(seq, target))  # (B, L, H)
            g = a.mean(-1).masked_fill(~seq["mask"], float("-inf"))            # (B, L)
            idx = top_k(g, min(k, L))                                          # (B, k)
            a_top = torch.gather(a, 1, idx.unsqueeze(-1).expand(-1, -1, a.shape[2]))   # (B, k, H)
            return self.pool(a_top, seq["mask"][0][idx], v[0][idx])
        return self._one_sequence(qp, kp, cs, v, seq, min(k, L))

    def _one_sequence(self, qp, kp, cs, v, seq: dict, k: int) -> torch.Tensor:
        """ESU over the top k rows (k = L: every row) of ONE sequence broadcast over the B candidates of qp
        (B, H, dk), no target-match terms -> (B, out_dim). alpha' of every (head, candidate, row) is H matmuls
        (H, B, dk) x (H, dk, L) plus a per-row constant (cross terms [+ ln n]); with k < L the GSU keeps the
        top k rows of its head mean (top_k) and the softmax runs over those k only, its weights scattered back
        into (H, B, L); the weights meet the L values in H matmuls (nothing of size B*k*H*dk is gathered)."""
        B, L = seq["mask"].shape
        m0 = seq["mask"][0]                                                    # (L,)
        row = cs[0].float() @ self.beta.float().T                              # (L, H) cross part of alpha'
        if self.use_log_n:
            row = row + seq["log_n"][0].float().unsqueeze(-1)
        q = (qp.float() / math.sqrt(self.dk)).transpose(0, 1)                  # (H, B, dk), scaled once
        a = torch.baddbmm(row.T.unsqueeze(1), q, kp[0].float().permute(1, 2, 0)).float()   # alpha' (H, B, L), one pass
        if k < L:
            g = a.mean(0).masked_fill(~m0, float("-inf"))                      # (B, L) the GSU's head mean
            idx = top_k(g, k).unsqueeze(0).expand(self.H, -1, -1)              # (H, B, k)
            a_sel, m_sel = torch.gather(a, 2, idx), m0[idx]                    # (H, B, k)
            w = torch.zeros_like(a).scatter_(2, idx, masked_softmax(a_sel, m_sel, dim=2))   # (H, B, L)
        else:
            a_sel, m_sel = a, m0.expand_as(a)
            w = masked_softmax(a, m_sel, dim=2)                                # (H, B, L) ESU weights
        out = torch.bmm(w.to(v.dtype), v[0].transpose(0, 1))                   # (H, B, dk)
        out = out.transpose(0, 1).reshape(B, self.H * self.dk)
        if not self.mass:
            return out
        lse = torch.logsumexp(a_sel.masked_fill(~m_sel, -1e4), dim=2).T        # (B, H)
        return torch.cat([out, nn.functional.softplus(lse).to(out.dtype)], dim=-1)

    def attend(self, q_kh: torch.Tensor, seq: dict, features: Features, target: dict | None = None) -> torch.Tensor:
        """ESU: multi-head target attention over the whole (already selected) sequence -> (B, out_dim). One
        sequence per sample without the cache (training, batch scoring): attend_rows, which projects no row.
        One sequence broadcast over the candidates (serving) without target-match terms: _one_sequence."""
        if self._cache is None and not is_broadcast(seq):
            return self.attend_rows(q_kh, seq, features, target)
        kp, cs, v = self.project(seq, features)
        if not (target is not None and self.match_fields) and seq["mask"].shape[0] > 1 and is_broadcast(seq):
            return self._one_sequence(self.query(q_kh), kp, cs, v, seq, seq["mask"].shape[1])
        a = self.scores(self.query(q_kh), kp, cs, seq["log_n"], self.target_match(seq, target))  # (B, L, H)
        return self.pool(a, seq["mask"], v)

    def attend_rows(self, q_kh: torch.Tensor, seq: dict, features: Features,
                    target: dict | None = None) -> torch.Tensor:
        """attend() of B sequences of their own, B*L rows, without projecting a row. W^h and W^v are linear, so

            (K_h,i W^h_h) . (q W^q_h) = K_h,i . u_h,      u_h = W^h_h (q W^q_h)            (B, H, d_h)
            sum_i w_ih (K_i W^v_h)     = (sum_i w_ih K_i) W^v_h                              (B, H, d_h + J c)

        the query moves into the rows' input space and the softmax pools the raw rows before W^v: per row
        H (d_h + d_h + J c) multiply-adds instead of the two projections d_h x H*dk and (d_h + J c) x H*dk (768
        against 12,288 at d_h = 80, J c = 32, H = 4, H*dk = 64; pipelines/benchmark/cost.py counts both). The same
        value and gradients as pool(scores(project())) up to float summation order (tests/models/test_attention.py)."""
        B, L = seq["mask"].shape
        H, dk = self.H, self.dk
        x = features.rows(seq)                                                     # (B, L, d_h + J c)
        kh = x[..., :self.d_h]                                                     # (B, L, d_h) K_h, a view
        ce = x[..., self.d_h:].unflatten(-1, (self.J, self.c))                    # (B, L, J, c) K_c, a view
        cs = torch.einsum("bljc,jc->blj", ce, self.w_c.to(ce.dtype))               # (B, L, J)
        qp = self.query(q_kh)                                                      # (B, H, dk)
        u = torch.einsum("bhd,hdf->bhf", qp, self.w_h.weight.view(H, dk, -1).to(qp.dtype)) / math.sqrt(dk)
        a = torch.bmm(kh, u.transpose(1, 2).to(kh.dtype)).float()                 # (B, L, H) K_h . u_h
        a = self.row_terms(a, cs, seq["log_n"], self.target_match(seq, target))    # alpha' (B, L, H)
        w = masked_softmax(a, seq["mask"].unsqueeze(-1), dim=1)                    # (B, L, H)
        pooled = torch.bmm(w.transpose(1, 2).to(x.dtype), x)                      # (B, H, d_h + J c)
        out = torch.einsum("bhf,hdf->bhd", pooled, self.w_v.weight.view(H, dk, -1).to(pooled.dtype))
        return self.with_mass(out.reshape(B, H * dk), a, seq["mask"])             # (B, out_dim)

    def pool(self, a: torch.Tensor, mask: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """alpha' (B, L, H), mask (B, L), values (B, L, H, dk) -> softmax-weighted values, heads concatenated
        (B, H*dk), then with `mass` the match mass of each head (B, H):

            mass_h = softplus(logsumexp_i alpha'_ih)   (0 for an empty sequence)

        The softmax output is a weighted MEAN: it says what the matching behaviours look like, not how many
        there are. logsumexp_i(alpha_i + ln n_i) = ln sum_i n_i exp(alpha_i) is a soft count of the
        behaviours that match the target (each cluster counted n times), the quantity the softmax divides
        out; softplus keeps it >= 0 and smooth, and an all-padding row gives exactly 0."""
        w = masked_softmax(a, mask.unsqueeze(-1), dim=1)                       # (B, L, H)
        if v.shape[0] > 1 and v.stride(0) == 0:                                # one user's values, broadcast
            out = torch.einsum("blh,lhd->bhd", w.to(v.dtype), v[0])            # (B, H, dk), v not copied
        else:
            out = torch.einsum("blh,blhd->bhd", w.to(v.dtype), v)              # (B, H, dk)
        return self.with_mass(out.reshape(out.shape[0], self.H * self.dk), a, mask)

    def with_mass(self, out: torch.Tensor, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The pooled heads (B, H*dk), then with `mass` each head's match mass softplus(logsumexp_i alpha'_ih)
        (B, H) of alpha' (B, L, H) over the real rows of mask (B, L) (pool's docstring)."""
        if not self.mass:
            return out
        lse = torch.logsumexp(a.float().masked_fill(~mask.unsqueeze(-1), -1e4), dim=1)   # (B, H)
        return torch.cat([out, nn.functional.softplus(lse).to(out.dtype)], dim=-1)
