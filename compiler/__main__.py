"""``python -m compiler MODEL_OR_SHAPE [--arch FILE] [...]``: compile and print a mapping summary.

MODEL_OR_SHAPE: a zoo name (rwkv_tiny, rwkv_169m, rwkv_430m, rwkv_1b5, rwkv_3b; vocab 50277),
a shape ``24x1024[x50277]``, or a ``config.json``. ``--out FILE.npz|.json`` saves the Program.
"""
from __future__ import annotations

import argparse
import sys
import time

from compiler.program import CompileError, compile
from compiler.tiling import SPLITS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compiler", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="zoo name, shape LxC[xV], or config.json")
    ap.add_argument("--arch", default=None, help="chip TOML (default: the shipped seneca_sim/seneca.toml)")
    ap.add_argument("--format", default=None, help="weight number format (default: the arch's)")
    ap.add_argument("--sparsity", type=float, default=0.5, help="expected activation sparsity for the split choice")
    ap.add_argument("--split", default="auto", choices=("auto",) + SPLITS)
    ap.add_argument("--objective", default="energy", choices=("energy", "flits"))
    ap.add_argument("--chips", type=int, default=None, help="number of chips (default: as many as needed)")
    ap.add_argument("--no-head", action="store_true", help="leave the LM head off the chip")
    ap.add_argument("--no-improve", action="store_true", help="skip the local placement improvement")
    ap.add_argument("--layers", action="store_true", help="also print the per-matrix table")
    ap.add_argument("--out", default=None, help="save the Program (.npz or .json)")
    a = ap.parse_args(argv)
    from seneca_sim.arch import ArchError, load_arch

    try:
        arch = load_arch(a.arch)
        t0 = time.perf_counter()
        prog = compile(a.model, arch, weight_format=a.format, include_head=not a.no_head, expected_sparsity=a.sparsity,
                       split=a.split, objective=a.objective, chips=a.chips, improve=not a.no_improve)
        dt = time.perf_counter() - t0
    except (CompileError, ArchError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = prog.summary()
    print(f"{s['model']}: {s['shape']} on {s['arch']} (compiled in {dt:.1f} s)")
    print(f"  cores       {s['cores']:,} of {s['cores_available']:,} on {s['chips']} chip(s) "
          f"({prog.meta['chips_x']}x{prog.meta['chips_y']} chips of {prog.meta['mesh_cols']}x{prog.meta['mesh_rows']})")
    print(f"  weights     {s['weight_bytes'] / 2**20:,.1f} MiB {s['weight_format']}; data memory used "
          f"{s['memory_bytes'] / 2**20:,.1f} MiB (mean {s['memory_use_mean']:.0%}, max {s['memory_use_max']:.0%} of a core)")
    print(f"  splits      " + ", ".join(f"{k} {v}" for k, v in sorted(s["splits"].items())))
    print(f"  MACs/token  {s['macs_per_token']:,} (dense)")
    print(f"  traffic     at sparsity {a.sparsity:.0%}: events {s['event_flit_hops']:,.0f}, partial sums "
          f"{s['psum_flit_hops']:,.0f}, transfers {s['transfer_flit_hops']:,.0f} flit-hops/token; "
          f"{s['chip_flit_hops']:,.0f} chip-crossing flits")
    print(f"  routes      {s['routes']:,} multicast trees, {s['mean_dests_per_route']:.1f} destinations each")
    print(f"  placement   {s['placement']}")
    if a.layers:
        print(prog.layer_table().to_string(index=False))
    if a.out:
        print(f"  saved       {prog.save(a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
