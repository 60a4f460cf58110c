"""The checks every entry point applies to params: model names, `--set` overrides and impossible values.

Below both the CLI (pipelines/cli.py) and the benchmark (pipelines/benchmark/), which import it; it imports
nothing of pipelines/.

    MODELS                         the trainable model names (a test holds them equal to twinv2.models.TRAINABLE)
    parse_overrides(pairs)         ["train.lr=0.01", ...] -> {"train.lr": 0.01} (values are YAML)
    check_overrides(base, ov, src) refuse an override that does not fit the params it changes (below)

Every refusal is a twinv2.errors.ConfigError (exit 3) naming the key, what it got and what it expects.
"""
from __future__ import annotations

from typing import Any

from twinv2.errors import ConfigError

# the trainable models (twinv2.models.TRAINABLE: REGISTRY's neural models + gbdt; kept here so that --help
# needs no torch import; a test holds the two together)
MODELS = ("twinv2", "twin", "twin_full", "sim_hard", "sim_soft", "eta", "sdim", "din", "avg_pool", "gbdt")


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


def check_overrides(base: dict, overrides: dict[str, Any], source: str) -> dict[str, Any]:
    """Refuse a --set that does not fit the params it changes: a section replaced by a value (train=5),
    a key under a value (train.lr.x=1), an unknown section, or a value of another kind than the one it
    replaces (train.lr=abc). Keys new to a known section are allowed (stages read optional keys)."""
    out = {}
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] not in base:
            raise ConfigError(f"--set {key}=...: {parts[0]!r} is not a section of {source}; expected one of "
                              f"{sorted(base)} (e.g. --set train.lr=0.003)")
        node: Any = base
        for i, part in enumerate(parts[:-1]):
            node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                raise ConfigError(f"--set {key}=...: {'.'.join(parts[:i + 1])} is {_kind(node)} "
                                  f"({node!r}) in {source}, not a section, so it has no key {parts[i + 1]!r}")
            if node is None:
                break
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
