"""Host description stored beside every timing; JSON files are strict JSON."""

from __future__ import annotations

import pytest

from cwac.utils import ISA_FLAGS, cpu_clock, cpuinfo, host_info, other_cores

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


def test_other_cores_is_the_hosts_busy_time_less_this_processs_over_the_wall_time():
    # (wall, host busy CPU s, this process's CPU s): 10 s in which the host was busy 15 CPU s, 6 of them ours
    assert other_cores((100.0, 50.0, 2.0), (110.0, 65.0, 8.0)) == 0.9
    assert other_cores((100.0, 50.0, 2.0), (110.0, 55.0, 8.0)) == 0.0      # jiffy rounding never goes negative
    assert other_cores(None, (110.0, 65.0, 8.0)) is None                 # not Linux
    assert other_cores((100.0, 50.0, 2.0), (100.0, 65.0, 8.0)) is None   # no time passed


@pytest.mark.skipif(cpu_clock() is None, reason="needs Linux's /proc/stat")
def test_other_cores_sees_a_busy_neighbour_and_not_this_processs_own_work():
    import subprocess
    import sys
    import time

    def spin(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass

    start = cpu_clock()
    spin(1.0)                                    # our own work is not "other"
    alone = other_cores(start, cpu_clock())
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass"])
    time.sleep(0.3)                              # the child has started spinning
    start = cpu_clock()
    time.sleep(1.0)
    beside = other_cores(start, cpu_clock())
    child.wait()
    assert beside - alone > 0.5, (alone, beside)
