"""cwac.host_allocator: ``retain`` keeps large blocks out of mmap (so freed pages are reused, not
faulted in again), ``glibc`` maps them; the setting is applied by the cell and is not hashed.

Each allocator check runs in a fresh interpreter: mallopt changes the whole process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cwac import host_allocator

glibc = pytest.mark.skipif(host_allocator._libc() is None, reason="the C library is not glibc")

# Allocates and frees a 64 MiB tensor, then reports glibc's mmapped bytes while a second one is held.
_PROBE = r"""
import ctypes, json, sys
import torch
from cwac.host_allocator import set_host_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
mode = sys.argv[1]
for m in mode.split(","):
    set_host_allocator(m)
before = libc.mallinfo2().hblkhd
x = torch.ones(16 * 2**20)          # 64 MiB, above any mmap threshold
del x
y = torch.ones(16 * 2**20)
print(json.dumps({"mmapped": libc.mallinfo2().hblkhd - before, "heap": libc.mallinfo2().arena}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_retain_serves_large_tensors_from_the_heap_and_glibc_maps_them():
    retain, untouched, restored = _probe("retain"), _probe("glibc"), _probe("retain,glibc")
    assert retain["mmapped"] == 0 and retain["heap"] >= 64 * 2**20
    assert untouched["mmapped"] >= 64 * 2**20   # glibc's own behaviour, which retain removes
    assert restored["mmapped"] >= 64 * 2**20    # switched back within one process (benchmarks)


def test_a_bad_mode_is_refused_and_the_setting_is_not_hashed_but_is_checked(tiny_cfg):
    from omegaconf import OmegaConf

    from cwac.records import config_hash
    from cwac.schema import ConfigError, check_choices

    with pytest.raises(ValueError, match="host_allocator='fast' is not valid; valid values: retain, glibc"):
        host_allocator.set_host_allocator("fast")
    cfg = tiny_cfg()
    assert cfg.host_allocator == "retain"    # the shipped default (conf/config.yaml)
    other = OmegaConf.merge(cfg, {"host_allocator": "glibc"})
    assert config_hash(other) == config_hash(cfg)
    with pytest.raises(ConfigError, match="host_allocator"):
        check_choices(OmegaConf.merge(cfg, {"host_allocator": "jemalloc"}))


@glibc
def test_the_cell_applies_the_setting_and_the_host_record_names_it(tiny_cfg, monkeypatch):
    from cwac.experiment.cell import setup_env
    from cwac.utils import host_info

    applied = []
    monkeypatch.setattr("cwac.experiment.cell.set_host_allocator", applied.append)
    setup_env(tiny_cfg())
    assert applied == ["retain"]
    monkeypatch.setattr(host_allocator, "_current", "retain")
    assert host_info()["host_allocator"] == "retain"
