"""TWIN-V2 (Si et al., CIKM 2024): TWIN's GSU/ESU over the user's clusters with alpha' = alpha + ln(n).

long = the user's clusters as of the watermark (virtual items, log_n = ln cluster size), at most
`twin_window` of them: the same GSU budget as TWIN on raw behaviours. ln(n) is ADDED: under softmax a
cluster of n members then weighs exactly like its virtual item repeated n times.

params `model.log_n` (default true, the paper): false drops the ln(n) term from the GSU's and the ESU's
scores (the "ln n off" ablation): TWIN-V2 then scores its clusters exactly as TWIN scores raw behaviours.
"""
from __future__ import annotations

from twinv2.models.twin import TWIN


class TWINV2(TWIN):
    name = "twinv2"
    long_source = "clusters"
    use_log_n = True

    def log_n_switch(self, p: dict) -> bool:
        v = p.get("log_n", True)
        if not isinstance(v, bool):
            raise ValueError(f"params model.log_n must be true (alpha' = alpha + ln n, the paper) or false "
                             f"(no ln n term), got {v!r}")
        return v
