"""Shared layers: feature embeddings (K_h, K_c), the MLP head, masks and gathers.

Notation (docs/models.md): B batch, L long sequence, S short sequence, k GSU top-k, J cross features,
d_h = embed_dim + 3 * side_dim (item-inherent embedding), c = cross_dim (8 in the paper).
"""
from __future__ import annotations

import torch
import torch.nn as nn

INHERENT = ("item", "author", "category", "dur_bucket")   # item-inherent features: they form K_h
SEQ_KEYS = INHERENT + ("cross", "mask", "log_n")


def row_sums(idx: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """(n, d) table whose row v is the sum of rows[i] over idx[i] == v: an embedding's weight gradient.
    idx (N,) int64, rows (N, d). On the CPU, index_add_ is fast on contiguous rows of >= 16 floats but several
    times slower on narrower rows and on strided ones, as the slices of a concatenated K_h's gradient are: rows
    are made contiguous, and below 16 columns summed by one bincount over the flattened (row, column) cells.
    `twinv2 train` end to end: 1.08x (docs/models.md, bench/train_vs_commit.sh 3b8d44d from 330b7c4)."""
    d = rows.shape[1]
    rows = rows.contiguous()
    if rows.device.type == "cpu" and d < 16 and rows.dtype in (torch.float32, torch.float64):
        cells = (idx[:, None] * d + torch.arange(d, device=idx.device)).reshape(-1)        # (N * d,)
        return torch.bincount(cells, rows.reshape(-1), minlength=n * d).view(n, d).to(rows.dtype)
    return torch.zeros(n, d, dtype=rows.dtype, device=rows.device).index_add_(0, idx, rows)


class _IndexAddLookup(torch.autograd.Function):
    """weight[idx] whose weight gradient is ONE row sum of the output gradient rows (zeroed at padding_idx)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor, padding_idx):
        ctx.save_for_backward(idx)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        return nn.functional.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        n, d = ctx.shape
        gw = row_sums(idx.reshape(-1), grad.reshape(-1, d), n)
        if ctx.padding_idx is not None:
            gw[ctx.padding_idx] = 0
        return gw, None, None


class Embedding(nn.Embedding):
    """nn.Embedding (same parameters, state dict and forward) whose weight gradient on the CPU is one row sum
    (row_sums): aten's dense embedding backward was slower on the CPU for every table size (the training step,
    8e30b4e; tests/models/test_embedding_grad.py holds the gradients equal to nn.Embedding's up to float
    summation order). Elsewhere (CUDA, no gradient, inside torch.compile) it is nn.Embedding."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if (self.weight.device.type == "cpu" and self.weight.requires_grad and torch.is_grad_enabled()
                and not self.sparse and self.max_norm is None and not self.scale_grad_by_freq
                and not torch.compiler.is_compiling()):      # inductor writes its own backward (train.compile)
            return _IndexAddLookup.apply(self.weight, idx, self.padding_idx)
        return super().forward(idx)


class Features(nn.Module):
    """Embeds the item-inherent features into K_h and the J cross features into K_c.

    K_h = [E_item[item], E_author[author], E_category[category], E_dur[dur_bucket]]   (..., d_h)
    K_c embeddings: E_j[cross_j] for j < J, each cross_dim wide                         (..., J, c)
    Index 0 is padding in every vocabulary (its embedding is the zero vector).
    """

    def __init__(self, vocab: dict, embed_dim: int, side_dim: int, cross_dim: int, init_std: float = 0.1):
        super().__init__()
        check_vocab(vocab)
        self.item = Embedding(vocab["item"], embed_dim, padding_idx=0)
        self.author = Embedding(vocab["author"], side_dim, padding_idx=0)
        self.category = Embedding(vocab["category"], side_dim, padding_idx=0)
        self.dur_bucket = Embedding(vocab["dur_bucket"], side_dim, padding_idx=0)
        self.cross = nn.ModuleList(Embedding(int(n), cross_dim, padding_idx=0) for n in vocab["cross"])
        self.d_h = embed_dim + 3 * side_dim
        self.n_cross = len(vocab["cross"])
        self.cross_dim = cross_dim
        for emb in [self.item, self.author, self.category, self.dur_bucket, *self.cross]:
            nn.init.normal_(emb.weight, std=init_std)
            with torch.no_grad():
                emb.weight[0].zero_()

    def tables(self) -> list[tuple[str, nn.Embedding]]:
        """The item-inherent tables in K_h column order (used to build per-feature caches)."""
        return [(name, getattr(self, name)) for name in INHERENT]

    def inherent(self, f: dict) -> torch.Tensor:
        """K_h of a target dict (B,) or a sequence dict (B, L) -> (..., d_h)."""
        return torch.cat([emb(f[name]) for name, emb in self.tables()], dim=-1)

    def rows(self, seq: dict) -> torch.Tensor:
        """[K_h, K_c] of a sequence dict in one concatenation -> (B, L, d_h + J * c): the item-inherent blocks,
        then each cross feature's embedding (the column order of W^v's input)."""
        x = seq["cross"]
        return torch.cat([emb(seq[name]) for name, emb in self.tables()]
                         + [emb(x[..., j]) for j, emb in enumerate(self.cross)], dim=-1)

    def cross_emb(self, seq: dict) -> torch.Tensor:
        """seq["cross"] (B, L, J) bucket ids -> (B, L, J, c)."""
        x = seq["cross"]
        return torch.stack([emb(x[..., j]) for j, emb in enumerate(self.cross)], dim=-2)


class MLP(nn.Module):
    """The prediction head shared by every model: Linear-ReLU stack, then one logit."""

    def __init__(self, d_in: int, hidden: list[int]):
        super().__init__()
        layers, d = [], d_in
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # (B, d_in) -> (B,)
        return self.net(x).squeeze(-1)


class PeriodicEmbedding(nn.Module):
    """Each scalar input feature -> its own d-dim vector (the "PLR" numeric embedding of Gorishniy et al., 2022,
    "On Embeddings for Numerical Features in Tabular Deep Learning"):

        v_j = [sin(2 pi c_j x_j), cos(2 pi c_j x_j)]   (c_j: k learned frequencies of feature j, init N(0, sigma^2))
        e_j = ReLU(W_j v_j + b_j)                        (W_j: (d, 2k), one per feature)

    An MLP on raw counts has to build thresholds out of ReLUs; the periodic basis gives it sharp, local
    functions of each count from the first layer on. (B, F) -> (B, F * d)."""

    def __init__(self, n_features: int, k: int, d: int, sigma: float):
        super().__init__()
        if n_features < 1 or k < 1 or d < 1 or not sigma > 0:
            raise ValueError(f"PeriodicEmbedding needs n_features, k, d >= 1 and sigma > 0, got "
                             f"{n_features}, {k}, {d}, {sigma}")
        self.n_features, self.k, self.d = n_features, k, d
        self.freq = nn.Parameter(torch.randn(n_features, k) * sigma)                 # (F, k)
        bound = (2 * k) ** -0.5                                                    # nn.Linear's default init
        self.weight = nn.Parameter(torch.empty(n_features, 2 * k, d).uniform_(-bound, bound))   # (F, 2k, d)
        self.bias = nn.Parameter(torch.empty(n_features, d).uniform_(-bound, bound))            # (F, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # (B, F) -> (B, F * d)
        if x.dim() != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"PeriodicEmbedding expects (B, {self.n_features}) inputs, got {tuple(x.shape)}")
        z = 2 * torch.pi * x.float().unsqueeze(-1) * self.freq                       # (B, F, k)
        v = torch.cat([torch.sin(z), torch.cos(z)], dim=-1)                          # (B, F, 2k)
        e = torch.relu(torch.einsum("bfi,fid->bfd", v, self.weight) + self.bias)     # (B, F, d)
        return e.reshape(x.shape[0], -1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over `dim` where mask is True; masked entries get weight exactly 0 and an all-masked
    slice gets all-zero weights (never NaN). Computed in float32 (also under bf16 autocast)."""
    logits = logits.float().masked_fill(~mask, torch.finfo(torch.float32).min)
    w = torch.softmax(logits, dim=dim)
    return w * mask


def gather_seq(seq: dict, idx: torch.Tensor) -> dict:
    """Select positions idx (B, k) of every (B, L, ...) tensor of a sequence dict -> (B, k, ...)."""
    out = {}
    for key, x in seq.items():
        if not torch.is_tensor(x) or x.dim() < 2:
            continue
        i = idx.reshape(idx.shape + (1,) * (x.dim() - 2)).expand(idx.shape + x.shape[2:])
        out[key] = torch.gather(x, 1, i)
    return out


def is_broadcast(seq: dict) -> bool:
    """True when every tensor of a (B, L, ...) sequence dict is one row expanded over B > 1 (stride 0):
    one user's history scored against B candidates."""
    ts = [x for x in seq.values() if torch.is_tensor(x) and x.dim() >= 2]
    return bool(ts) and ts[0].shape[0] > 1 and all(x.stride(0) == 0 for x in ts)


def first_positions(seq: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`retrieve` of models without a GSU: the whole long sequence capped at k -> idx, valid (B, k')."""
    mask = seq["mask"]
    k = min(k, mask.shape[1])
    idx = torch.arange(k, device=mask.device).expand(mask.shape[0], k)
    return idx, mask[:, :k]


def check_vocab(vocab: dict) -> None:
    for key in INHERENT:
        if key not in vocab or int(vocab[key]) < 1:
            raise ValueError(f"vocab[{key!r}] is {vocab.get(key)!r}: expected the vocabulary size "
                             f"including padding index 0 (an int >= 1); got keys {sorted(vocab)}")
    cross = vocab.get("cross")
    if not isinstance(cross, (list, tuple)) or len(cross) == 0 or any(int(n) < 1 for n in cross):
        raise ValueError(f"vocab['cross'] is {cross!r}: expected a non-empty list of J bucket-vocabulary "
                         "sizes (completion, play time, log time gap, then extra cross fields)")


def check_batch(batch: dict, vocab: dict, parts: tuple[str, ...]) -> None:
    """Shape/dtype checks of the batch contract (docs/architecture.md, "Model input"); index ranges too
    for CPU tensors (on an accelerator that check would force a sync per batch)."""
    if "target" not in batch:
        raise ValueError(f"batch lacks 'target'; expected keys target, short, long, label, got {sorted(batch)}")
    tgt = batch["target"]
    for key in INHERENT:
        if key not in tgt:
            raise ValueError(f"batch['target'] lacks {key!r}; expected {list(INHERENT)}")
    B = tgt["item"].shape[0]
    J = len(vocab["cross"])
    for part in parts:
        if part not in batch:
            raise ValueError(f"batch lacks {part!r}; this model reads {list(parts)}")
        seq = batch[part]
        missing = [k for k in SEQ_KEYS if k not in seq]
        if missing:
            raise ValueError(f"batch[{part!r}] lacks {missing}; expected keys {list(SEQ_KEYS)}")
        shape = tuple(seq["mask"].shape)
        if len(shape) != 2 or shape[0] != B:
            raise ValueError(f"batch[{part!r}]['mask'] has shape {shape}, expected (B={B}, length)")
        if seq["mask"].dtype != torch.bool:
            raise ValueError(f"batch[{part!r}]['mask'] has dtype {seq['mask'].dtype}, expected torch.bool")
        for key in INHERENT + ("log_n",):
            if tuple(seq[key].shape) != shape:
                raise ValueError(f"batch[{part!r}][{key!r}] has shape {tuple(seq[key].shape)}, expected {shape}")
        if tuple(seq["cross"].shape) != shape + (J,):
            raise ValueError(f"batch[{part!r}]['cross'] has shape {tuple(seq['cross'].shape)}, "
                             f"expected {shape + (J,)} (J={J} cross features)")
    if tgt["item"].device.type != "cpu":
        return
    for part in ("target",) + parts:
        f = batch[part]
        for key in INHERENT:
            x = f[key]
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= int(vocab[key])):
                raise ValueError(f"batch[{part!r}][{key!r}] holds ids in [{int(x.min())}, {int(x.max())}], "
                                 f"expected [0, {int(vocab[key])}) (vocab size incl. padding 0)")
        if part != "target" and f["cross"].numel():
            for j, n in enumerate(vocab["cross"]):
                x = f["cross"][..., j]
                if int(x.min()) < 0 or int(x.max()) >= int(n):
                    raise ValueError(f"batch[{part!r}]['cross'][..., {j}] holds buckets in "
                                     f"[{int(x.min())}, {int(x.max())}], expected [0, {int(n)})")
