"""The table of SPIR-V variants: one entry per `.spv` file, its `.comp` source and defines.

Data only, so the build tool and the runtime read the same table; the one import is the
format's GGML type-id table (pack_format/constants.py). Specialization constants (workgroup
size, rows/tokens per workgroup, head_dim) are chosen at run time by `vkpack.runtime.vk.ops`.
Entries with `"reduce": True` use common/reduce.glsl and also get a `<name>_nosg` variant
built with -DNO_SUBGROUP for devices without subgroup arithmetic.
"""

from ..pack_format.constants import GGML_TYPE_IDS

# The weight formats the matmul/embed shaders read -> their GGML type id (the WTYPE define).
# common/dequant.glsl decodes each; runtime/vk/ops.py states its shader units.
QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
WEIGHT_TYPES = {name: GGML_TYPE_IDS[name] for name in ("F32", "F16", "BF16", *QUANT_TYPES)}

VARIANTS: dict[str, dict] = {}
for _name, _code in WEIGHT_TYPES.items():
    VARIANTS[f"matmul_{_name.lower()}"] = {"source": "matmul.comp", "defines": {"WTYPE": _code}, "reduce": True}
    VARIANTS[f"matmul_tiled_{_name.lower()}"] = {"source": "matmul_tiled.comp", "defines": {"WTYPE": _code},
                                                 "reduce": False}
    VARIANTS[f"embed_{_name.lower()}"] = {"source": "embed.comp", "defines": {"WTYPE": _code}, "reduce": False}
    # decode matvec, one subgroup per row group (subgroup arithmetic required: no _nosg twin)
    VARIANTS[f"matvec_{_name.lower()}"] = {"source": "matvec.comp", "defines": {"WTYPE": _code}, "reduce": False}
    # a mixture's chosen experts in one dispatch, weights anywhere in the tier's blocks (subgroups required)
    VARIANTS[f"moe_matvec_{_name.lower()}"] = {"source": "moe_matvec.comp", "defines": {"WTYPE": _code},
                                               "reduce": False}
    # a mixture's prefill: every chosen expert's rows in one tiled dispatch, weights anywhere in the tier's blocks
    VARIANTS[f"moe_matmul_{_name.lower()}"] = {"source": "moe_matmul.comp", "defines": {"WTYPE": _code},
                                               "reduce": False}
# decode matvec by sub-block for K-quants (subgroups required)
MATVEC_K_TYPES = ("Q4_K", "Q6_K")
for _name in MATVEC_K_TYPES:
    VARIANTS[f"matvec_k_{_name.lower()}"] = {"source": "matvec_k.comp", "defines": {"WTYPE": WEIGHT_TYPES[_name]},
                                             "reduce": False}
# tensor-core prefill matmul (VK_NV_cooperative_matrix; F32 and BF16 stay on matmul_tiled)
COOP_TYPES = ("F16", *QUANT_TYPES)
for _name in COOP_TYPES:
    VARIANTS[f"matmul_coop_{_name.lower()}"] = {"source": "matmul_coop.comp",
                                                "defines": {"WTYPE": WEIGHT_TYPES[_name]}, "reduce": False}
VARIANTS.update({
    "rms_norm": {"source": "rms_norm.comp", "defines": {}, "reduce": True},
    "rope": {"source": "rope.comp", "defines": {}, "reduce": False},
    "kv_store_f32": {"source": "kv_store.comp", "defines": {}, "reduce": False},
    "kv_store_f16": {"source": "kv_store.comp", "defines": {"KV_F16": 1}, "reduce": False},
    "kv_store_rope_f32": {"source": "kv_store_rope.comp", "defines": {}, "reduce": False},
    "kv_store_rope_f16": {"source": "kv_store_rope.comp", "defines": {"KV_F16": 1}, "reduce": False},
    "attention_f32": {"source": "attention.comp", "defines": {}, "reduce": True},
    "attention_f16": {"source": "attention.comp", "defines": {"KV_F16": 1}, "reduce": True},
    # split-K decode attention: subgroup ops required (no _nosg twins; Ops falls back to attention_*)
    "attention_split_f32": {"source": "attention_split.comp", "defines": {}, "reduce": False},
    "attention_split_f16": {"source": "attention_split.comp", "defines": {"KV_F16": 1}, "reduce": False},
    "attention_merge": {"source": "attention_merge.comp", "defines": {}, "reduce": False},
    "swiglu": {"source": "swiglu.comp", "defines": {}, "reduce": False},
    "geglu": {"source": "swiglu.comp", "defines": {"GELU": 1}, "reduce": False},
    "unary": {"source": "unary.comp", "defines": {}, "reduce": False},
    "add": {"source": "add.comp", "defines": {}, "reduce": False},
    "stream_read": {"source": "stream_read.comp", "defines": {}, "reduce": False},
    "argmax": {"source": "argmax.comp", "defines": {}, "reduce": True},
    "moe_rows": {"source": "moe_rows.comp", "defines": {}, "reduce": False},
    "moe_route": {"source": "moe_route.comp", "defines": {}, "reduce": False},
    "splitk_sum": {"source": "splitk_sum.comp", "defines": {}, "reduce": False},
})


def all_variants() -> dict[str, dict]:
    """Every .spv to build: the table plus the `_nosg` twins of reducing shaders."""
    out = dict(VARIANTS)
    for name, v in VARIANTS.items():
        if v["reduce"]:
            out[name + "_nosg"] = {**v, "defines": {**v["defines"], "NO_SUBGROUP": 1}}
    return out
