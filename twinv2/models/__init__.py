"""TWIN-V2 and its baselines behind one contract (docs/architecture.md "Model input", docs/models.md).

    model = build_model("twinv2", vocab, params)     # params: params.yaml's dict or its `model:` section
    logits = model(batch)                            # (B,)
    idx, valid = model.retrieve(batch)               # (B, k) positions of batch["long"] the model reads
"""
from __future__ import annotations

from twinv2.models.avg_pool import AvgPool
from twinv2.models.base import CTRModel
from twinv2.models.din import DIN
from twinv2.models.eta import ETA
from twinv2.models.sdim import SDIM
from twinv2.models.sim import SIMHard, SIMSoft
from twinv2.models.twin import TWIN, TWINFull
from twinv2.models.twinv2 import TWINV2

REGISTRY: dict[str, type[CTRModel]] = {
    "twinv2": TWINV2,
    "twin": TWIN,
    "twin_full": TWINFull,
    "sim_hard": SIMHard,
    "sim_soft": SIMSoft,
    "eta": ETA,
    "sdim": SDIM,
    "din": DIN,
    "avg_pool": AvgPool,
}
MODEL_NAMES = tuple(REGISTRY)               # the neural models (build_model builds each)
TRAINABLE = (*MODEL_NAMES, "gbdt")          # everything `twinv2 train --model` accepts (gbdt: twinv2/models/gbdt.py)

REQUIRED = ("embed_dim", "side_dim", "cross_dim", "n_heads", "head_dim", "topk", "short_len", "twin_window",
            "twin_full_len", "din_len", "din_att_mlp", "mlp", "sim_soft_dim", "eta_bits", "sdim_hashes",
            "sdim_width")


def model_params(params: dict) -> dict:
    """The `model:` section of params.yaml (accepts the whole params dict or the section itself)."""
    p = params.get("model", params) if isinstance(params, dict) else None
    if not isinstance(p, dict):
        raise ValueError(f"model params must be a dict (params.yaml or its 'model:' section), got {type(params)}")
    missing = [k for k in REQUIRED if k not in p]
    if missing:
        raise ValueError(f"params.yaml section 'model' lacks {missing}; expected keys {list(REQUIRED)}")
    return p


def build_model(name: str, vocab: dict, params: dict) -> CTRModel:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {list(REGISTRY)}")
    return REGISTRY[name](vocab, model_params(params))


__all__ = ["build_model", "model_params", "REGISTRY", "MODEL_NAMES", "TRAINABLE", "CTRModel"]
