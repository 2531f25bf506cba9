"""Decode matvec configurations on a GPU, measured the way a model runs them (to pick Ops defaults).

Weights of several layers shaped as the 8B (or 1B) (q, k, v, o, gate, up, down, F16) live in distinct device
memory, so nothing is served from L2, and the linears are recorded back to back with a barrier
after each, as in a decode pass. Reports the weight read rate for each (workgroup, rows per
workgroup, units in flight) against the same pass's best.

    python tools/sweep_matvec.py [--layers 8] [--dtype F16]
"""

from __future__ import annotations

import argparse
import itertools
import sys

from vkpack.runtime.vk import Device, Ops, Recorder, Weight
from vkpack.runtime.vk.ops import WEIGHT_FORMATS

SHAPES = {  # one layer's linears: q, k, v, o, gate, up, down
    "8b": [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)],
    "1b": [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)],
}


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


def measure(dev: Device, ops: Ops, ws: list[Weight], x, y, reps: int) -> float:
    rec = Recorder(dev, timestamps=True)
    for w in ws:
        ops.linear(rec, w, x, y, 1)
        rec.barrier()
    rec.finish()
    for _ in range(3):
        rec.run()
    best = min(_run(rec) for _ in range(reps))
    rec.destroy()
    return best


def _run(rec: Recorder) -> float:
    rec.run()
    return rec.gpu_time_s()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="F16")
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--wg", default="64,128,256")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--units", default="1,2,4,8")
    args = ap.parse_args(argv)
    dev = Device()
    bufs, ws = weights(dev, args.layers, args.dtype, SHAPES[args.shape])
    total = sum(w.nbytes for w in ws)
    x, y = dev.alloc(14336 * 4), dev.alloc(14336 * 4)
    rec = Recorder(dev)
    rec.fill(x, 0x3DCCCCCD)  # 0.1f
    rec.run()
    rec.destroy()
    print(f"{dev}: {len(ws)} linears, {total / 1e9:.2f} GB of {args.dtype} weights per pass", flush=True)
    results = []
    grid = list(itertools.product(*(map(int, a.split(",")) for a in (args.wg, args.rows, args.units))))
    configs = [("matmul", *c) for c in grid] + [("matvec", *c) for c in grid]
    for kern, wg, nr, nu in configs:
        ops = Ops(dev)
        if kern == "matvec":
            ops.mv_subgroup, ops.mv_wg, ops.mv_rows, ops.mv_units = True, wg, nr, nu
        else:
            ops.mm_wg, ops.mm_rows, ops.mm_units = wg, nr, nu
        try:
            t = measure(dev, ops, ws, x, y, args.reps)
        except Exception as e:  # a configuration the device rejects (registers, shared memory)
            print(f"{kern} wg={wg} rows={nr} units={nu}: {type(e).__name__}: {e}", flush=True)
            continue
        results.append((t, kern, wg, nr, nu))
        print(f"{kern} wg={wg:3d} rows={nr} units={nu}: {t * 1e3:7.3f} ms  {total / t / 1e9:7.0f} GB/s  "
              f"{t / len(ws) * 1e6:6.1f} us/linear", flush=True)
    results.sort()
    for t, kern, wg, nr, nu in results[:5]:
        print(f"best: {kern} wg={wg} rows={nr} units={nu}: {total / t / 1e9:.0f} GB/s")
    for b in bufs + [x, y]:
        b.destroy()
    dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
