"""RoPE settings from a config.json as transformers 4 or 5 writes it.

transformers 4 writes a top-level `rope_theta` and an optional `rope_scaling` map; transformers 5 writes
`rope_parameters: {"rope_theta", "rope_type", ...}`, and for models whose layer types differ (gemma3's
sliding and full attention) one such map per layer type. A silent fallback to theta 10000 moves logits
enough to change greedy tokens, so every value read here is either understood or an error naming it.
"""

from __future__ import annotations

import logging
from typing import Any

from ...pack_format.errors import SourceError
from ..hparams_check import check_value

SCALING_TYPES = ("linear", "llama3")            # folded into the rope op's freq_factors at build time
log = logging.getLogger(__name__)
_KNOWN_KEYS = {"rope_theta", "rope_type", "type", "factor", "original_max_position_embeddings",
               "low_freq_factor", "high_freq_factor", "partial_rotary_factor"}


def rope_settings(cfg: dict[str, Any], layer_type: str | None = None, default_theta: float = 10000.0) -> dict[str, Any]:
    """{"theta": float, "scaling": dict | None, "partial": float} for one layer type (None: the only one).

    `partial` is the fraction of each head that rope rotates (phi3's partial_rotary_factor, else 1).
    `default_theta` is the family's transformers default, for old configs that name no theta at all.
    """
    params = cfg.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise SourceError(f"config.json rope_parameters: expected a map, got {type(params).__name__}")
        if params and all(isinstance(v, dict) for v in params.values()):  # one map per layer type
            if layer_type is None or layer_type not in params:
                want = layer_type or "one map for every layer"
                raise SourceError(f"config.json rope_parameters has maps for {', '.join(sorted(params))}; "
                                  f"expected {want}")
            params = params[layer_type]
        _check_consistent(cfg, params)
        return _parse(params, "rope_parameters", cfg, default_theta)
    if not isinstance(cfg.get("rope_scaling") or {}, dict):
        raise SourceError("config.json rope_scaling: expected a map or null")
    legacy = dict(cfg.get("rope_scaling") or {})
    if "rope_theta" in cfg and cfg["rope_theta"] is not None:
        legacy["rope_theta"] = cfg["rope_theta"]
    return _parse(legacy, "rope_scaling", cfg, default_theta)


def _check_consistent(cfg: dict[str, Any], params: dict[str, Any]) -> None:
    """A config carrying both forms must not disagree: which one a reader trusts would decide the model."""
    top = cfg.get("rope_theta")
    if top is not None and "rope_theta" in params and _num(top, "rope_theta") != _num(params["rope_theta"], "rope_theta"):
        raise SourceError(f"config.json: rope_theta {top} disagrees with rope_parameters.rope_theta "
                          f"{params['rope_theta']}")


def _parse(p: dict[str, Any], where: str, cfg: dict[str, Any], default_theta: float) -> dict[str, Any]:
    if "rope_theta" not in p:
        log.warning("config.json names no rope_theta; using the family's default %g", default_theta)
    theta = _num(p.get("rope_theta", default_theta), f"{where}.rope_theta")
    rtype = p.get("rope_type", p.get("type", "default"))
    partial = _num(p.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)), "partial_rotary_factor")
    if not 0 < partial <= 1:
        raise SourceError(f"config.json partial_rotary_factor {partial}: must be in (0, 1]")
    if rtype not in (None, "default", *SCALING_TYPES):
        raise SourceError(f"config.json {where}: rope_type {rtype!r} is not supported "
                          f"(default, {', '.join(SCALING_TYPES)} are)")
    unknown = sorted(set(p) - _KNOWN_KEYS)
    if unknown:
        raise SourceError(f"config.json {where}: key {unknown[0]!r} is not understood by vkpack")
    if rtype in (None, "default"):
        extra = sorted(set(p) & {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"})
        if extra:
            raise SourceError(f"config.json {where}: {extra[0]!r} given with rope_type default")
        return {"theta": theta, "scaling": None, "partial": partial}
    scaling = {"type": rtype, "factor": _num(p.get("factor", 1.0), f"{where}.factor"),
               "original_context": int(_num(p.get("original_max_position_embeddings", 0) or 0,
                                            f"{where}.original_max_position_embeddings", "count0")),
               "low_freq_factor": _num(p.get("low_freq_factor", 1.0), f"{where}.low_freq_factor"),
               "high_freq_factor": _num(p.get("high_freq_factor", 4.0), f"{where}.high_freq_factor")}
    return {"theta": theta, "scaling": scaling, "partial": partial}


def _num(v: Any, key: str, kind: str = "positive") -> float:
    """A config number of `kind` (hparams_check.check_value), as float; null counts as a wrong type here."""
    if v is None:
        raise SourceError(f"config.json {key}: expected a number, got None")
    check_value(v, kind, f"config.json {key}")
    return float(v)
