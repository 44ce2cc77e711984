"""What Inductor's autotuning measured: each tuned product's library time against its best Triton template.

Inductor (``max_autotune`` / ``max_autotune_gemm``) keeps every choice's time in its local autotune cache,
``$TORCHINDUCTOR_CACHE_DIR/cache/<system hash>`` (JSON; the hash covers the GPU's name and the torch and
Triton builds, so a cache serves only the same kind of card and software). Its log prints only the ten
best choices; this reads all of them. It flags times that cannot be kernel times (a product's FLOPs over
its time above the card's bf16 matmul peak), and prints each kind's floor, the fastest time measured:
a floor far above a microsecond's work points at the harness's own cost per call, which a replayed
CUDA graph need not pay.

    python3 benchmarks/autotune_report.py results/h200-2026-12-07-inductor-autotune-cache.json --peak 790
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from pathlib import Path

LIBRARY_PREFIXES = ("mm-", "addmm-", "bias_addmm-", "convolution-")  # cuBLAS / cuDNN; the rest are templates


def product_flops(op: str, layouts: list[tuple]) -> float | None:
    """2*M*N*K of a tuned mm/addmm (its input layouts are (device, dtype, rows, cols, strides..., offset))."""
    if op == "mm":
        (_, _, m, k, *_), (_, _, _, n, *_) = layouts
    elif op == "addmm":
        (_, _, m, k, *_), (_, _, _, n, *_) = layouts[1:]
    else:
        return None  # a convolution's output size depends on its stride: not counted
    return 2.0 * m * n * k


def rows(cache: dict) -> list[dict]:
    table = []
    for op, entries in cache.items():
        if op not in ("mm", "addmm", "convolution"):
            continue  # pad_mm's padding decisions share the file
        for key, by_precision in entries.items():
            layouts = ast.literal_eval(key)
            for times in by_precision.values():
                library = [t for name, t in times.items() if name.startswith(LIBRARY_PREFIXES)]
                templates = [t for name, t in times.items() if not name.startswith(LIBRARY_PREFIXES)]
                if not library or not templates:
                    continue
                table.append(
                    dict(
                        op=op,
                        shapes=" x ".join(str(tuple(layout[2:4])) for layout in layouts),
                        library_ms=min(library),
                        template_ms=min(templates),
                        flops=product_flops(op, layouts),
                    )
                )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path, help="Inductor's local autotune cache file (JSON)")
    parser.add_argument("--peak", type=float, default=790.0, help="the card's bf16 matmul peak, TFLOP/s")
    args = parser.parse_args()
    data = json.loads(args.cache.read_text())
    print(f"device: {data['system']['device']['name']}")
    table = rows(data["cache"])
    library_floor = min(r["library_ms"] for r in table)
    template_floor = min(r["template_ms"] for r in table)
    impossible = 0
    print(f"{'op':12s} {'shapes':48s} {'library ms':>10s} {'template ms':>11s} {'ratio':>6s} {'template TFLOP/s':>16s}")
    for r in sorted(table, key=lambda r: -r["library_ms"]):
        rate = r["flops"] / (r["template_ms"] * 1e-3) / 1e12 if r["flops"] else math.nan
        impossible += rate > args.peak
        flag = " above peak: not a kernel time" if rate > args.peak else ""
        print(
            f"{r['op']:12s} {r['shapes'][:48]:48s} {r['library_ms']:10.4f} {r['template_ms']:11.4f} "
            f"{r['library_ms'] / r['template_ms']:6.2f} {rate:16.0f}{flag}"
        )
    won = sum(r["template_ms"] < r["library_ms"] for r in table)
    print(
        f"{len(table)} tuned products; a template measured faster in {won}; {impossible} template times imply "
        f"more than {args.peak:.0f} TFLOP/s. Floors (the fastest time of each kind; far above a microsecond's "
        f"work, they point at the harness's own cost per call): library {library_floor:.4f} ms, "
        f"template {template_floor:.4f} ms. Sums: library "
        f"{sum(r['library_ms'] for r in table):.3f} ms, best templates {sum(r['template_ms'] for r in table):.3f} "
        f"ms; less each kind's floor: {sum(r['library_ms'] - library_floor for r in table):.3f} against "
        f"{sum(r['template_ms'] - template_floor for r in table):.3f} ms (each shape once, not per call)"
    )


if __name__ == "__main__":
    main()
