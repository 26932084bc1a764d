"""Host description stored beside every timing; JSON files are strict JSON."""

from __future__ import annotations

import pytest

from cwac.utils import ISA_FLAGS, cpuinfo, host_info

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9654
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni
processor\t: 1
model name\t: AMD EPYC 9654
flags\t\t: fpu sse2 avx avx2
"""


def test_cpuinfo_reads_the_first_processors_model_and_flags():
    cpu, flags = cpuinfo(CPUINFO)
    assert cpu == "AMD EPYC 9654"
    assert {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"} <= flags and "avx512" not in flags


def test_host_info_lists_only_known_isa_flags_in_a_fixed_order():
    h = host_info()
    assert h["cpus"] >= 1 and h["torch_threads"] >= 1 and h["cpu"]
    assert h["isa"] == [f for f in ISA_FLAGS if f in h["isa"]]
    assert h["gpu"] is None  # the tests run on CPU


def test_json_files_are_strict_json_with_non_finite_values_flagged(tmp_path):
    import json
    import math

    from cwac.utils import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"metrics": {"hs": math.nan, "fa": 50.0}, "xs": [1.0, math.inf]})
    rec = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert rec == {"metrics": {"hs": None, "fa": 50.0}, "xs": [1.0, None], "nonfinite": ["metrics.hs", "xs[1]"]}
