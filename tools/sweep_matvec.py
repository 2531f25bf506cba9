"""Decode matvec configurations on a GPU, measured the way a model runs them (to pick Ops defaults).

Weights of several layers shaped as the 8B (or 1B) (q, k, v, o, gate, up, down) live in distinct device
memory, so nothing is served from L2, and the linears are recorded back to back with a barrier after
each, as in a decode pass, timed with GPU timestamps. Measured side by side, without fusions and with
the ones the real pass uses (norm into q/k/v/gate/up, SwiGLU into down, o and down accumulating into
the residual), since they change what x costs: matmul.comp as Ops runs it by default (mm_* and
mv_config), then every (workgroup, rows per workgroup, units in flight) of --wg x --mm-rows x
--mm-units for the whole pass, and for Q4_K/Q6_K shaders/matvec_k.comp at each --kquant setting (plain
pass). Prints the weight read rate of each, its ratio to the default (Ops as the engine runs them), and the
best per shape and fusion. --by-role instead measures each kind of linear on its own and prints the
Ops.mv_config to take. (A decode kernel with x staged in shared memory and a persistent row loop was
tried and measured 0.72-0.86x of matmul.comp on the H100 in every configuration; it was removed.)

    python tools/sweep_matvec.py --shape both                   # the whole pass, both shapes
    python tools/sweep_matvec.py --by-role --shape 8b           # per kind of linear: mv_config
    python tools/sweep_matvec.py --shape 1b --layers 1 --quick   # smoke test (lavapipe)
"""

from __future__ import annotations

import argparse
import itertools
import sys

from vk_bench import gpu_best  # tools/ is on the path when this file runs as a script
from vkpack.runtime.vk import Device, Ops, Recorder, Weight
from vkpack.runtime.vk.errors import VulkanError
from vkpack.runtime.vk.ops import WEIGHT_FORMATS
from vkpack.shaders.variants import MATVEC_K_TYPES

SHAPES = {  # one layer's linears: q, k, v, o, gate, up, down
    "8b": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)],
    "1b": [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)],
}
NORM_FUSED, GLU_FUSED, ACCUMULATE = (0, 1, 2, 4, 5), (6,), (3, 6)   # indices into a layer's linears


def weights(dev: Device, layers: int, dtype: str, shapes: list[tuple[int, int]]) -> tuple[list, list]:
    """Distinct weights filled on the device (values do not change the read rate)."""
    block, bb, _, _ = WEIGHT_FORMATS[dtype]
    bufs, ws = [], []
    for _ in range(layers):
        for rows, cols in shapes:
            b = dev.alloc(rows * cols // block * bb)
            rec = Recorder(dev)
            rec.fill(b, 0x2E662E66)  # f16 0.1 pairs; for blocks any pattern with finite scales
            rec.run()
            rec.destroy()
            bufs.append(b)
            ws.append(Weight(b, 0, dtype, rows, cols))
    return bufs, ws


def measure(dev: Device, ops: Ops, ws: list[Weight], acts: dict, fused: bool, reps: int, warmup: int,
            roles: tuple[int, ...] = tuple(range(7))) -> float:
    """Best GPU seconds of one pass over the linears of ws whose role is in `roles` (the real pass's
    fusions when `fused`)."""
    rec = Recorder(dev, timestamps=True)
    for i, w in enumerate(ws):
        role = i % 7
        if role not in roles:
            continue
        kw: dict = {}
        if fused:
            kw = {"norm": (acts["nw"], 1e-5)} if role in NORM_FUSED else {"glu_up": acts["u"]} if role in GLU_FUSED \
                else {}
            kw["accumulate"] = role in ACCUMULATE
        ops.linear(rec, w, acts["x"], acts["y"], 1, **kw)
        rec.barrier()
    rec.finish()
    try:
        return gpu_best(rec, reps, warmup)
    finally:
        rec.destroy()


def setup(dev: Device, args: argparse.Namespace, shape: str) -> tuple[list, list, dict]:
    """The shape set's weights (args.layers layers) and activations x, y, u, nw filled with 0.1."""
    bufs, ws = weights(dev, args.layers, args.dtype, SHAPES[shape])
    n = max(c for _, c in SHAPES[shape]) + max(r for r, _ in SHAPES[shape])
    acts = {k: dev.alloc(n * 4) for k in ("x", "y", "u", "nw")}
    rec = Recorder(dev)
    for b in acts.values():
        rec.fill(b, 0x3DCCCCCD)  # 0.1f
    rec.run()
    rec.destroy()
    return bufs, ws, acts


def teardown(bufs: list, acts: dict) -> None:
    for b in bufs + list(acts.values()):
        b.destroy()


def grid(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """Every (workgroup, rows, units) of --wg x --mm-rows x --mm-units."""
    return list(itertools.product(ints(args.wg), ints(args.mm_rows), ints(args.mm_units)))


def mm_ops(dev: Device, wg: int, nr: int, nu: int) -> Ops:
    """Ops running matmul.comp at (wg, nr, nu) for every linear of the pass, fused or not."""
    o = Ops(dev)
    o.mm_wg, o.mm_rows, o.mm_units = wg, nr, nu
    o.mv_config = {}   # no per-fusion override: mm_* for T = 1 too
    o.mv_unfused, o.mv_kquant = {}, {}
    return o


def kq_ops(dev: Device, dtype: str, cfg: tuple[int, ...]) -> Ops:
    """Ops running shaders/matvec_k.comp at cfg (workgroup, rows a subgroup computes, rows per workgroup,
    chunks in flight)."""
    o = Ops(dev)
    o.mv_kquant = {dtype: cfg}
    return o


ROLE_SETS = {"qkv": (0, 1, 2), "o": (3,), "gate_up": (4, 5), "down": (6,)}


def sweep_roles(dev: Device, args: argparse.Namespace, shape: str) -> None:
    """matmul.comp's (workgroup, rows, units) for each kind of linear on its own, plain and fused: the
    fusions load x, the norm weight or u again in every workgroup, so fewer, wider workgroups may pay
    off where they run."""
    bufs, ws, acts = setup(dev, args, shape)
    base = Ops(dev)
    default = (base.mm_wg, base.mm_rows, base.mm_units)
    print(f"\n{shape}: matmul.comp per kind of linear ({args.layers} layers; default wg/rows/units {default})")
    times: dict[tuple[str, str], dict[tuple, float]] = {}
    for fusion in ("plain", "fused"):
        for name, roles in ROLE_SETS.items():
            nbytes = sum(w.nbytes for i, w in enumerate(ws) if i % 7 in roles)
            res = []
            for wg, nr, nu in grid(args):
                try:
                    res.append((measure(dev, mm_ops(dev, wg, nr, nu), ws, acts, fusion == "fused", args.reps, args.warmup, roles), wg, nr, nu))
                except VulkanError as e:
                    print(f"{shape} {fusion} {name} wg={wg} rows={nr} units={nu}: {e}")
            res.sort()
            times[(fusion, name)] = {tuple(c): t for t, *c in res}
            ref = next((t for t, *c in res if tuple(c) == default), None)
            line = " ".join(f"[wg={wg} rows={nr} units={nu}: {nbytes / t / 1e9:.0f} GB/s]" for t, wg, nr, nu in res[:3])
            dflt = f"default {nbytes / ref / 1e9:.0f} GB/s, " if ref else ""
            print(f"{shape:3s} {fusion:6s} {name:8s} {dflt}best {line}", flush=True)
    # Ops.mv_config as the fused pass would take it: unfused (o), norm-fused (q/k/v and gate/up), SwiGLU (down)
    def best(names: tuple[str, ...]) -> tuple:
        common = set.intersection(*(set(times[("fused", n)]) for n in names))
        return min(common, key=lambda c: sum(times[("fused", n)][c] for n in names))

    cfg = f"mv_config={{0: {best(('o',))}, 1: {best(('qkv', 'gate_up'))}, 2: {best(('down',))}}}".replace(" ", "")
    print(f"{shape} {cfg}")
    teardown(bufs, acts)


def default_ops(dev: Device, matmul: bool) -> Ops:
    """Ops as the engine runs them; matmul: without matvec_k (the kernel of the fused products)."""
    o = Ops(dev)
    if matmul:
        o.mv_kquant = {}
    return o


def kq_grid(args: argparse.Namespace) -> list[tuple[int, ...]]:
    """--kquant's (workgroup, rows a subgroup computes, rows per workgroup, chunks in flight), as W:N:R:C,..."""
    return [tuple(int(v) for v in c.split(":")) for c in args.kquant.split(",") if c]


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def sweep_shape(dev: Device, args: argparse.Namespace, shape: str) -> list[tuple]:
    """Measure one shape set; returns its rows (shape, fusion, label, seconds, bytes)."""
    bufs, ws, acts = setup(dev, args, shape)
    total = sum(w.nbytes for w in ws)
    print(f"\n{shape}: {len(ws)} linears, {total / 1e9:.2f} GB of {args.dtype} weights per pass", flush=True)
    rows: list[tuple] = []

    def run_one(fusion: str, label: str, ops: Ops) -> float | None:
        try:
            t = measure(dev, ops, ws, acts, fusion == "fused", args.reps, args.warmup)
        except VulkanError as e:  # a configuration the device rejects (registers, shared memory)
            print(f"{shape:3s} {fusion:6s} {label:44s} {type(e).__name__}: {e}", flush=True)
            return None
        rows.append((shape, fusion, label, t, total))
        ref = next((r[3] for r in rows if r[:3] == (shape, fusion, "default")), t)
        print(f"{shape:3s} {fusion:6s} {label:44s} {t * 1e3:8.3f} ms {total / t / 1e9:7.0f} GB/s  "
              f"{ref / t:5.2f}x default", flush=True)
        return t

    for fusion in ("plain", "fused"):
        run_one(fusion, "default", default_ops(dev, fusion == "fused"))
        if fusion == "plain" and args.dtype in Ops(dev).mv_kquant:   # the matmul.comp path matvec_k replaces
            run_one(fusion, "matmul (mv_kquant off)", default_ops(dev, True))
        for wg, nr, nu in grid(args):
            run_one(fusion, f"matmul wg={wg} rows={nr} units={nu}", mm_ops(dev, wg, nr, nu))
        if fusion == "plain" and args.dtype in MATVEC_K_TYPES:
            for cfg in kq_grid(args):
                run_one(fusion, "matvec_k wg={} rows/subgroup={} rows={} chunks={}".format(*cfg),
                        kq_ops(dev, args.dtype, cfg))
    teardown(bufs, acts)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="both", choices=[*sorted(SHAPES), "both"])
    ap.add_argument("--layers", type=int, default=8, help="distinct layers of weights (8: 3.5 GB for the 8B)")
    ap.add_argument("--dtype", default="F16")
    ap.add_argument("--reps", type=int, default=5, help="timed runs of each pass (the best counts)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--wg", default="64,128,256", help="matmul.comp workgroup sizes")
    ap.add_argument("--mm-rows", default="1,2,4,8", help="matmul.comp rows per workgroup")
    ap.add_argument("--mm-units", default="1,2", help="matmul.comp units in flight")
    ap.add_argument("--kquant", default="128:2:8:1,128:1:4:1,128:2:16:1,64:2:4:1,256:2:16:1,128:4:16:1,"
                                        "128:2:8:2,128:1:4:2,128:4:16:2,64:1:2:1,32:1:1:1,32:2:2:1",
                    help="shaders/matvec_k.comp configurations for Q4_K/Q6_K, W:N:R:C (workgroup, rows a subgroup "
                         "computes, rows per workgroup, chunks in flight per lane), plain pass only")
    ap.add_argument("--by-role", action="store_true",
                    help="instead: matmul.comp configurations for each kind of linear (q/k/v, o, gate/up, down)")
    ap.add_argument("--quick", action="store_true", help="smoke test: one configuration per axis, one run each")
    args = ap.parse_args(argv)
    dev = Device()
    if args.quick:
        args.wg, args.mm_rows, args.mm_units = str(dev.info.subgroup_size * 2), "2,4", "1"
        args.kquant = f"{dev.info.subgroup_size * 2}:2:4:2"
        args.reps, args.warmup = 1, 0
    print(f"{dev}", flush=True)
    shapes = sorted(SHAPES) if args.shape == "both" else [args.shape]
    if args.by_role:
        for shape in shapes:
            sweep_roles(dev, args, shape)
        dev.close()
        return 0
    rows = []
    for shape in shapes:
        rows += sweep_shape(dev, args, shape)
    print("\nbest per shape and fusion:")
    for key in sorted({r[:2] for r in rows}):
        group = sorted((r for r in rows if r[:2] == key), key=lambda r: r[3])
        mm = next((r[3] for r in group if r[2] == "default"), None)
        for shape, fusion, label, t, total in group[:3]:
            vs = f"  {mm / t:5.2f}x default" if mm else ""
            print(f"{shape:3s} {fusion:6s} {label:44s} {total / t / 1e9:7.0f} GB/s{vs}")
    dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
