"""benchmarks/autotune_report.py reads Inductor's autotune cache: every candidate, library against templates."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.autotune_report import product_flops, rows

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "autotune_report.py"
MM_KEY = "[('cuda', 'torch.bfloat16', 16384, 320, 320, 1, 0), ('cuda', 'torch.bfloat16', 320, 4, 1, 320, 0)]"
ADDMM_KEY = (
    "[('cuda', 'torch.bfloat16', 4, 1280, 0, 1, 0), ('cuda', 'torch.bfloat16', 4, 320, 320, 1, 0), "
    "('cuda', 'torch.bfloat16', 320, 1280, 1, 320, 0)]"
)
CACHE = {
    "mm": {MM_KEY: {"highest": {"mm-abc": 0.04, "triton_mm-x": 0.02, "triton_mm-y": 0.012}}},
    "addmm": {ADDMM_KEY: {"highest": {"bias_addmm-a": 0.09, "addmm-b": 0.05, "triton_mm-z": 0.011}}},
    "base mm time: ((torch.Size([16384, 4]),), None)": 0.01,  # pad_mm's entries share the file
}


def test_each_product_gets_its_fastest_library_call_and_fastest_template():
    table = {r["op"]: r for r in rows(CACHE)}
    assert set(table) == {"mm", "addmm"}
    assert (table["mm"]["library_ms"], table["mm"]["template_ms"]) == (0.04, 0.012)
    assert (table["addmm"]["library_ms"], table["addmm"]["template_ms"]) == (0.05, 0.011)  # addmm beats bias_addmm
    assert table["mm"]["flops"] == 2 * 16384 * 4 * 320
    assert product_flops("addmm", ast.literal_eval(ADDMM_KEY)) == 2 * 4 * 1280 * 320
    assert product_flops("convolution", ast.literal_eval(MM_KEY)) is None


def test_the_report_runs_on_a_cache_file(tmp_path: Path):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"system": {"device": {"name": "NVIDIA H200"}}, "cache": CACHE}))
    out = subprocess.run([sys.executable, str(REPORT), str(path)], capture_output=True, text=True, check=True).stdout
    assert "NVIDIA H200" in out and "2 tuned products; a template measured faster in 2" in out
    assert "library 0.0400 ms, template 0.0110 ms" in out
