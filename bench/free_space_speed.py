"""The free space of a new basis at SD1.5's layer widths: the dense path against the low-rank one.

For each width n (320, 640 and 1280 for image-side layers, 768 for the text context) and a bank of K / 4
earlier rank-4 concepts, the earlier moment is what the trainer builds: m = 32 columns of sketch per earlier
concept and the prior (capped here at 96), each with its tail. Both paths get the same moment, the same
earlier bases and theta = 0.9; each is timed as the median of interleaved repeats, on one thread.

    python bench/free_space_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import parse_args, write_result

from seqlora_core.method import basis as bs

CASES = ((320, 32, 0), (640, 64, 4), (768, 32, 0), (768, 96, 8), (1280, 64, 4), (1280, 96, 8))


def moment(n: int, m: int, gen: torch.Generator) -> bs.LowRankMoment:
    u = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))[0]
    d = torch.sort(torch.rand(m, generator=gen, dtype=torch.float64) * 10 + 0.1, descending=True)[0]
    return bs.LowRankMoment(u, d, 0.01)


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = parse_args(ap)
    torch.set_num_threads(args.threads or 1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, m, k in CASES:
        s_old = moment(n, m, gen)
        q = bs.span_basis([torch.randn(k, n, generator=gen)], n) if k else None
        dense = s_old.dense()
        bs.free_space(dense, q, 4, 0.9), bs.free_space(s_old, q, 4, 0.9)  # warm up
        t_dense = timed(lambda dense=dense, q=q: bs.free_space(dense, q, 4, 0.9), args.repeats)
        t_low = timed(lambda s_old=s_old, q=q: bs.free_space(s_old, q, 4, 0.9), args.repeats)
        rows.append({"n": n, "m": m, "K": k, "dense_s": t_dense, "low_rank_s": t_low, "speedup": t_dense / t_low})
        print(
            f"n {n:5d}  m {m:3d}  K {k:2d}  dense {t_dense * 1e3:7.1f} ms  low rank {t_low * 1e3:6.1f} ms  "
            f"{t_dense / t_low:5.1f}x",
            flush=True,
        )
    path = write_result("free_space_speed_cpu", {"how": __doc__, "repeats": args.repeats, "cases": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
