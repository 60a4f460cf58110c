"""What a cell costs per candidate: GSU positions and multiply-adds counted from the module shapes."""
from __future__ import annotations

from pathlib import Path

from twinv2.io import read_json


def gsu_positions(run: Path) -> int | None:
    """Positions of the long sequence the GSU scores per candidate (at most): model.long_len of the run's
    config (raw behaviours, or clusters for TWIN-V2); None for a model without a long part."""
    try:
        cfg = read_json(run / "config.json")
    except (OSError, ValueError):
        return None
    if cfg.get("long_source") in (None, "none"):
        return None
    return cfg.get("long_len")


def _linear_macs(mod) -> int:
    """Multiply-adds of one row through every nn.Linear inside `mod` (in_features * out_features each)."""
    import torch.nn as nn

    return sum(m.in_features * m.out_features for m in mod.modules() if isinstance(m, nn.Linear))


def _attention_macs(att, n_gsu: int, n_esu: int, features=None) -> int:
    """One TwinAttention for one candidate: a GSU scoring n_gsu positions and/or an ESU attending n_esu positions
    (keys, values, softmax pooling), each stage with its own query projection. The GSU (TwinAttention.gsu_scores)
    projects the query back to K_h space once (u = (q W^q) W^h: H*dk x d_h), then per position one d_h dot (a
    K_h table with no more rows than positions: its n_f x d_f rows . u once instead) and the target-match terms F,
    plus the per-id cross scalars of every cross table (n_j x c each, `features`).
    The ESU (TwinAttention.attend_rows) projects no row: once per candidate the query (d_h x H*dk), u_h = W^h_h
    (q W^q_h) (H*dk x d_h) and the output projection of the H pooled rows ((d_h + J*c) x H*dk); per position,
    from the module's shapes: the score K_h . u_h (H x d_h), cross scalars J x c, cross terms H x J, target-match
    terms H x F, and the pooling of the raw row (H x (d_h + J*c))."""
    hd = att.w_q.out_features
    n_match = len(att.match_fields)
    d_h, d_in, H = att.w_h.in_features, att.w_v.in_features, att.H
    per_key = (H * d_h + att.w_c.numel() + att.beta.numel() + (att.beta_m.numel() if att.match_fields else 0))
    per_val = H * d_in
    query = att.w_q.in_features * att.w_q.out_features
    esu = query + hd * d_h + d_in * hd
    gsu = 0
    if n_gsu > 0:
        tables = sum(e.num_embeddings * e.embedding_dim for e in features.cross) if features is not None else 0
        # K_h . u table by table: a table with no more rows than positions is projected whole (n_f x d_f), the
        # others per position (d_f each)
        inherent = [(e.num_embeddings, e.embedding_dim) for _, e in features.tables()] if features is not None \
            else [(n_gsu + 1, att.w_h.in_features)]
        small = sum(n * d for n, d in inherent if n <= n_gsu)
        per_row = sum(d for n, d in inherent if n > n_gsu)
        gsu = query + hd * att.w_h.in_features + n_gsu * (per_row + n_match) + small + tables
    return gsu + (esu + n_esu * (per_key + per_val) if n_esu > 0 else 0)


def macs_per_candidate(model, params: dict | None = None) -> int | None:
    """Multiply-adds one candidate costs in one forward (the uncached serving path: no per-id projection
    cache, nothing shared across candidates), counted from the module shapes and the sequence lengths:
    GSU over the long sequence (long_len positions) + ESU over its top-k (k' = min(topk, long_len)) + the
    short attention (short_len positions) + the head MLP. Elementwise products (DIN's k * q, a * v) count as
    multiply-adds; embedding lookups, softmax, top-k and sums cost none. None for a model that is not a
    neural CTRModel (gbdt). `params` (the `model` section or the whole dict; optional): the params the model
    was built with, checked against it (topk, short_len) so a count is never of other lengths than given."""
    from twinv2.models.base import CTRModel, TwoStage
    from twinv2.models.din import DIN
    from twinv2.models.eta import ETA
    from twinv2.models.sdim import SDIM
    from twinv2.models.sim import SIMSoft
    from twinv2.models.twin import TWIN

    if not isinstance(model, CTRModel):
        return None
    mp = (params or {}).get("model", params or {})
    for key, have in (("topk", model.topk), ("short_len", model.short_len)):
        if key in mp and int(mp[key]) != have:
            raise ValueError(f"macs_per_candidate: the {model.name} model was built with {key} {have}, params "
                             f"model.{key} is {mp[key]!r}; pass the params the model was built with")
    k, S, L = model.topk, model.short_len, model.long_len
    kk = min(k, L)
    f = model.features
    d_kc = f.d_h + f.n_cross * f.cross_dim                                  # [K_h, K_c] width
    macs = _attention_macs(model.short, 0, S) + _linear_macs(model.head)
    if model.long_source == "none":
        return int(macs)
    if isinstance(model, TWIN):                                             # TWIN / TWIN-V2: one module, 2 stages
        macs += _attention_macs(model.long_attn, L, kk, f)
    elif isinstance(model, TwoStage):                                       # own GSU, then the ESU on k'
        macs += _attention_macs(model.long_attn, 0, kk)
        if isinstance(model, SIMSoft):                                      # e'_i . e'_q and the pooled side input
            macs += 2 * L * model.soft.embedding_dim
        elif isinstance(model, ETA):                                        # SimHash of the L behaviours + target
            macs += (L + 1) * model.planes.shape[0] * model.planes.shape[1]
    elif isinstance(model, SDIM):                                           # hashes, then bucket sums per hash
        macs += (L + 1) * model.planes.shape[0] * model.planes.shape[1] + L * model.m * d_kc
    elif isinstance(model, DIN):                                            # activation unit + values per position
        macs += L * (_linear_macs(model.activation) + f.d_h + _linear_macs(model.w_v) + model.w_v.out_features)
    # AvgPool: a masked mean, no multiply-add
    return int(macs)


def model_macs(run: Path) -> int | None:
    """macs_per_candidate of a trained run's model (None for gbdt or an unreadable run)."""
    try:
        cfg = read_json(run / "config.json")
        if cfg.get("model") == "gbdt":
            return None
        from twinv2.training.scoring import load_run_model

        model, _, _ = load_run_model(run)
        return macs_per_candidate(model)
    except Exception:  # noqa: BLE001 - a measurement, never a failure of the cell
        return None
