"""The checks every entry point applies to params: model names, `--set` overrides and impossible values.

Below both the CLI (pipelines/cli.py) and the benchmark (pipelines/benchmark/), which import it; it imports
nothing of pipelines/.

    MODELS                         the trainable model names (a test holds them equal to twinv2.models.TRAINABLE)
    parse_overrides(pairs)         ["train.lr=0.01", ...] -> {"train.lr": 0.01} (values are YAML)
    check_overrides(base, ov, src) refuse an override that does not fit the params it changes (below)
    check_values(params, src)      refuse impossible values (train.epochs=0, a negative rate, ...)

Every refusal is a twinv2.errors.ConfigError (exit 3) naming the key, what it got and what it expects.
"""
from __future__ import annotations

import difflib
from typing import Any

from twinv2.errors import ConfigError

# the trainable models (twinv2.models.TRAINABLE: REGISTRY's neural models + gbdt; kept here so that --help
# needs no torch import; a test holds the two together)
MODELS = ("twinv2", "twin", "twin_full", "sim_hard", "sim_soft", "eta", "sdim", "din", "avg_pool", "gbdt")

# keys the stages read (with a default) that params.yaml does not list: accepted by --set
# (validate / cluster / evaluate .progress: the tqdm switch twinv2.progress.bar reads from the stage's section)
OPTIONAL_KEYS = {"cluster.embeddings", "validate.gx_result_format", "train.features.pop_log2_max",
                 "validate.progress", "cluster.progress", "evaluate.progress", "train.compile",
                 "train.prefetch", "train.fast_batches"}
# mappings whose keys are free (any WorldConfig field; any variant name): a new key there is not a typo
FREE_FORM = {"generate.knobs", "benchmark.variants"}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs as {dotted key: value}; the value is YAML."""
    import yaml

    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE with a dotted params.yaml key, for example "
                              f"--set train.lr=0.01")
        k, v = pair.split("=", 1)
        if not k or any(not part for part in k.split(".")):
            raise ConfigError(f"--set {pair!r}: {k!r} is not a dotted params.yaml key (e.g. train.lr)")
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    return out


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean (true/false)"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a section"
    return type(v).__name__


def _known_keys(node: dict, path: str, reference: dict | None) -> set[str]:
    keys = set(node)
    ref = reference
    for part in path.split(".") if path else ():
        ref = ref.get(part) if isinstance(ref, dict) else None
    if isinstance(ref, dict):
        keys |= set(ref)
    keys |= {k.rsplit(".", 1)[1] for k in OPTIONAL_KEYS if k.rsplit(".", 1)[0] == path}
    return keys


def _unknown_key(key: str, path: str, leaf: str, allowed: set[str], source: str, base: dict) -> ConfigError:
    close = difflib.get_close_matches(leaf, sorted(allowed), n=1, cutoff=0.6)
    if close:
        hint = f" (did you mean {path}.{close[0]}?)"
    else:                                        # the key of another section? (train.learning_rate -> gbdt's)
        others = [f"{s}.{k}" for s, sec in base.items() if isinstance(sec, dict) and s != path for k in sec]
        near = [o for o in others if difflib.get_close_matches(leaf, [o.split(".", 1)[1]], n=1, cutoff=0.8)]
        hint = f" (a key of that name is {near[0]})" if near else ""
    return ConfigError(f"--set {key}=...: {leaf!r} is not a key of {path} in {source}{hint}; the keys of {path}: "
                       f"{', '.join(sorted(allowed))}")


def check_overrides(base: dict, overrides: dict[str, Any], source: str,
                    reference: dict | None = None) -> dict[str, Any]:
    """Refuse a --set that does not fit the params it changes: a section replaced by a value (train=5),
    a key under a value (train.lr.x=1), an unknown section, a key that no section of params.yaml has
    (train.learnig_rate: a typo; the close match is suggested), or a value of another kind than the one it
    replaces (train.lr=abc). The keys a mapping accepts are those of `base`, of `reference` (the repository's
    params.yaml when base is another file) and OPTIONAL_KEYS; inside FREE_FORM mappings any key is accepted.
    Returns the overrides with their values coerced to the kind they replace (1e-3 read as a number)."""
    out = {}
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] not in base:
            close = difflib.get_close_matches(parts[0], sorted(base), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"--set {key}=...: {parts[0]!r} is not a section of {source}{hint}; expected one of "
                              f"{sorted(base)} (e.g. --set train.lr=0.003)")
        node: Any = base
        for i, part in enumerate(parts[:-1]):
            path = ".".join(parts[:i + 1])
            node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                raise ConfigError(f"--set {key}=...: {path} is {_kind(node)} "
                                  f"({node!r}) in {source}, not a section, so it has no key {parts[i + 1]!r}")
            if node is None or path in FREE_FORM:
                node = None
                break
            nxt = parts[i + 1]
            allowed = _known_keys(node, path, reference)
            if nxt not in allowed:
                raise _unknown_key(key, path, nxt, allowed, source, base)
        old = node.get(parts[-1]) if isinstance(node, dict) else None
        if isinstance(old, dict) and not isinstance(value, dict):
            raise ConfigError(f"--set {key}={value!r}: {key} is a section of {source} (keys "
                              f"{', '.join(sorted(old)) or 'none'}); --set replaces one value inside it, e.g. "
                              f"--set {key}.{next(iter(old), 'KEY')}=VALUE")
        if old is not None and value is not None and not isinstance(old, dict):
            if isinstance(old, str) and not isinstance(value, (dict, list)):
                value = value if isinstance(value, str) else str(value)
            elif _kind(old) == "a number" and isinstance(value, str):
                try:                                     # YAML 1.1 reads 1e-3 (no dot) as a string
                    value = float(value) if any(c in value for c in ".eE") else int(value)
                except ValueError:
                    raise ConfigError(f"--set {key}={value!r}: expected a number like the {old!r} of {source}, "
                                      f"got a string") from None
            elif _kind(old) != _kind(value):
                raise ConfigError(f"--set {key}={value!r}: expected {_kind(old)} like the {old!r} of {source}, "
                                  f"got {_kind(value)}")
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ values
def _schema():
    """pydantic models of the values that have a possible range; a key absent from params is not checked
    (its stage's default applies), unknown keys pass (check_overrides judges names)."""
    from typing import Literal, Optional

    from pydantic import BaseModel, ConfigDict, Field, field_validator

    def Pos():                                       # noqa: N802 - a fresh "> 0 or absent" field each time
        return Field(default=None, gt=0)

    class Section(BaseModel):
        model_config = ConfigDict(extra="allow", strict=False)

    class Train(Section):
        lr: Optional[float] = Pos()
        weight_decay: Optional[float] = Field(default=None, ge=0)
        bias_lr: Optional[float] = Pos()
        user_bias_lr: Optional[float] = Pos()
        batch_size: Optional[int] = Field(default=None, ge=1)
        eval_batch_size: Optional[int] = Field(default=None, ge=1)
        epochs: Optional[int] = Field(default=None, ge=1)
        patience: Optional[int] = Field(default=None, ge=0)
        num_workers: Optional[int] = Field(default=None, ge=0)
        grad_clip: Optional[float] = Field(default=None, ge=0)
        log_every: Optional[int] = Field(default=None, ge=1)
        keep_checkpoints: Optional[int] = Field(default=None, ge=0)
        optimizer: Optional[Literal["adam", "adamw"]] = None
        prefetch: Optional[int] = Field(default=None, ge=0)
        fast_batches: Optional[bool] = None
        compile: Optional[bool] = None

    class Model(Section):
        embed_dim: Optional[int] = Field(default=None, ge=1)
        side_dim: Optional[int] = Field(default=None, ge=1)
        cross_dim: Optional[int] = Field(default=None, ge=1)
        embed_init_std: Optional[float] = Field(default=None, ge=0)
        n_heads: Optional[int] = Field(default=None, ge=1)
        head_dim: Optional[int] = Field(default=None, ge=1)
        topk: Optional[int] = Field(default=None, ge=1)
        short_len: Optional[int] = Field(default=None, ge=0)
        twin_window: Optional[int] = Field(default=None, ge=1)
        twin_full_len: Optional[int] = Field(default=None, ge=1)
        din_len: Optional[int] = Field(default=None, ge=1)
        user_bias_buckets: Optional[int] = Field(default=None, ge=2)
        numeric_embed: Optional[int] = Field(default=None, ge=0)
        numeric_dim: Optional[int] = Field(default=None, ge=1)
        virtual_mix: Optional[int] = Field(default=None, ge=0)
        mlp: Optional[list[int]] = None

        @field_validator("mlp")
        @classmethod
        def _widths(cls, v):
            if v is not None and any(w < 1 for w in v):
                raise ValueError("every layer width must be >= 1")
            return v

    class Cluster(Section):
        gamma: Optional[int] = Field(default=None, ge=1)
        exponent: Optional[float] = Field(default=None, gt=0, le=1)
        kmeans_iters: Optional[int] = Field(default=None, ge=1)
        n_shards: Optional[int] = Field(default=None, ge=1)
        n_jobs: Optional[int] = Field(default=None, ge=1)
        chunk_rows: Optional[int] = Field(default=None, ge=1)
        embedding_dim: Optional[int] = Field(default=None, ge=1)
        cooc_window: Optional[int] = Field(default=None, ge=1)
        drift_threshold: Optional[float] = Field(default=None, ge=0, le=1)
        incremental_step_ms: Optional[int] = Field(default=None, ge=1)
        group_edges: Optional[list[float]] = None

        @field_validator("group_edges")
        @classmethod
        def _edges(cls, v):
            if v is not None and (not v or any(b <= a for a, b in zip(v, v[1:]))):
                raise ValueError("expected a non-empty increasing list of completion-ratio edges")
            return v

    class Gbdt(Section):
        max_iter: Optional[int] = Field(default=None, ge=1)
        learning_rate: Optional[float] = Pos()
        max_leaf_nodes: Optional[int] = Field(default=None, ge=2)
        min_samples_leaf: Optional[int] = Field(default=None, ge=1)
        l2_regularization: Optional[float] = Field(default=None, ge=0)
        max_bins: Optional[int] = Field(default=None, ge=2, le=255)
        max_features: Optional[float] = Field(default=None, gt=0, le=1)
        n_iter_no_change: Optional[int] = Field(default=None, ge=1)
        recent_n: Optional[int] = Field(default=None, ge=1)
        recent_frac: Optional[float] = Field(default=None, gt=0, le=1)

    class Evaluate(Section):
        batch_size: Optional[int] = Field(default=None, ge=1)
        n_user_groups: Optional[int] = Field(default=None, ge=1)
        diversity_topn: Optional[int] = Field(default=None, ge=1)
        diversity_pool: Optional[int] = Field(default=None, ge=1)
        diversity_users: Optional[int] = Field(default=None, ge=1)

    class Validate(Section):
        max_quarantine_share: Optional[float] = Field(default=None, ge=0, le=1)
        max_completion: Optional[float] = Pos()
        batch_rows: Optional[int] = Field(default=None, ge=1)
        unsorted_policy: Optional[Literal["sort", "fail"]] = None

    class Ingest(Section):
        history_frac: Optional[float] = Field(default=None, ge=0, lt=1)
        valid_frac: Optional[float] = Field(default=None, gt=0, lt=1)
        test_frac: Optional[float] = Field(default=None, gt=0, lt=1)
        split: Optional[Literal["global", "per_user"]] = None
        chunk_bytes: Optional[int] = Field(default=None, ge=1)
        sort_budget_rows: Optional[int] = Field(default=None, ge=1)

    return {"train": Train, "model": Model, "cluster": Cluster, "gbdt": Gbdt, "evaluate": Evaluate,
            "validate": Validate, "ingest": Ingest}


def check_values(params: dict, source: str = "params") -> dict:
    """Refuse impossible values (train.epochs=0, train.lr=-1, train.batch_size=0, cluster.exponent=2, ...):
    a ConfigError naming every bad key, its value and the range it must be in. Returns params unchanged."""
    from pydantic import ValidationError

    problems = []
    for section, model in _schema().items():
        sec = params.get(section)
        if not isinstance(sec, dict):
            continue
        try:
            model.model_validate(sec)
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"])
                key = f"{section}.{loc}"
                got = sec.get(err["loc"][0]) if err["loc"] else None
                problems.append(f"{key}={got!r}: {err['msg'].lower()}")
    ing = params.get("ingest")
    if isinstance(ing, dict) and ing.get("split", "global") == "global":
        fr = [ing.get(k) for k in ("history_frac", "valid_frac", "test_frac")]
        if all(isinstance(x, (int, float)) for x in fr) and sum(fr) >= 1:
            problems.append(f"ingest.history_frac + valid_frac + test_frac = {sum(fr):g}: must be < 1 (train gets "
                            f"the rest)")
    if problems:
        raise ConfigError(f"impossible values in {source}: " + "; ".join(problems))
    return params
