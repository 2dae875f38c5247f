"""What the CPU kernels read from the machine (csrc/ops/cpu/cpu_features.h): the L1 geometry, the vector
clone and the coupling register-path limit; every clone and limit couples bit-exactly."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from itconv_fast import ops
from itconv_fast.ops import _extension
from itconv_fast.cli.app import main

pytestmark = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension not built")


def _sysfs_l1():
    base = "/sys/devices/system/cpu/cpu0/cache"
    for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        folder = os.path.join(base, entry)
        try:
            level = open(os.path.join(folder, "level")).read().strip()
            kind = open(os.path.join(folder, "type")).read().strip()
        except OSError:
            continue
        if level == "1" and kind != "Instruction":
            size = open(os.path.join(folder, "size")).read().strip()
            bytes_ = int(size[:-1]) * 1024 if size.endswith("K") else int(size)
            ways = int(open(os.path.join(folder, "ways_of_associativity")).read())
            return bytes_, ways
    return None


def test_l1_geometry_is_read_from_the_machine():
    info = _extension.cpu_info()
    expected = _sysfs_l1()
    if expected is None:
        pytest.skip("no sysfs cache description here")
    assert (info["l1d_bytes"], info["l1d_ways"]) == expected
    assert info["l1d_source"] in ("sysconf", "sysfs")
    assert info["l1d_sets"] == info["l1d_bytes"] // (info["l1d_ways"] * info["l1d_line"])


def test_isa_and_register_limit_follow_the_cpu():
    info = _extension.cpu_info()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if info["vector_clones"].startswith("none"):
        assert info["isa"] == "default"
    elif " avx512f" in flags:
        assert info["isa"] == "avx512f" and info["register_limit"] == 16
    elif " avx2" in flags:
        assert info["isa"] == "avx2" and info["register_limit"] == 7


def test_info_prints_the_cpu_tuning_and_the_arch_list():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert {"l1d_bytes", "l1d_ways", "l1d_sets", "isa", "register_limit", "compiler"} <= set(report["cpu_kernels"])
    if report["extension_cuda_kernels"]:
        assert "+PTX" in report["cuda_arch_list"]


_CHILD = r"""
import json, sys, torch
from itconv_fast import ops
from itconv_fast.ops import _extension, _reference
results = []
gen = torch.Generator().manual_seed(0)
for n in range(2, 18):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        # page-sized members (congruent in L1) and small ones
        for numel in (4096 + 3, 100):
            groups = [[torch.randn(numel, generator=gen).to(dtype) for _ in range(n)]]
            ref = [[t.clone() for t in groups[0]]]
            ops.soft_couple_(groups, 0.3)
            _reference.soft_couple_(ref, 0.3)
            results.append(all(torch.equal(a, b) for a, b in zip(groups[0], ref[0])))
print(json.dumps({"info": _extension.cpu_info(), "exact": all(results)}))
"""


@pytest.mark.parametrize("env", [
    {"ITCONV_FAST_CPU_ISA": "default"},
    {"ITCONV_FAST_CPU_ISA": "avx2"},
    {"ITCONV_FAST_CPU_ISA": "avx2", "ITCONV_FAST_REGISTER_LIMIT": "16"},
    {"ITCONV_FAST_L1": "49152,12"},
    {"ITCONV_FAST_REGISTER_LIMIT": "0"},
], ids=["default-isa", "avx2", "avx2-limit16", "icelake-l1", "no-register-path"])
def test_every_clone_and_tuning_couples_bit_exactly(env):
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["exact"]
    info = report["info"]
    widest = _extension.cpu_info()["widest_isa"]
    order = ["default", "avx2", "avx512f"]
    if "ITCONV_FAST_CPU_ISA" in env and order.index(env["ITCONV_FAST_CPU_ISA"]) <= order.index(widest):
        assert info["isa"] == env["ITCONV_FAST_CPU_ISA"]
        if "ITCONV_FAST_REGISTER_LIMIT" not in env:
            assert info["register_limit"] == {"default": 3, "avx2": 7}[env["ITCONV_FAST_CPU_ISA"]]
    if "ITCONV_FAST_REGISTER_LIMIT" in env:
        assert info["register_limit"] == int(env["ITCONV_FAST_REGISTER_LIMIT"])
    if "ITCONV_FAST_L1" in env:
        assert (info["l1d_bytes"], info["l1d_ways"], info["l1d_sets"], info["l1d_source"]) == (49152, 12, 64, "ITCONV_FAST_L1")


def test_a_wider_isa_than_the_cpu_has_is_refused():
    info = _extension.cpu_info()
    if info["widest_isa"] == "avx512f":
        pytest.skip("this CPU has the widest clone")
    out = subprocess.run([sys.executable, "-c", "from itconv_fast import _extension; print(_extension.cpu_info()['isa'])"],
                         env={**os.environ, "ITCONV_FAST_CPU_ISA": "avx512f"}, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == info["widest_isa"]
