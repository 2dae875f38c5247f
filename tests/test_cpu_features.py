"""What the CPU kernels read from the machine (csrc/ops/cpu/cpu_features.h): the L1 geometry, the vector
clone and the coupling register-path limit; every clone and limit couples bit-exactly."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from itconv_fast import ops
from itconv_fast.cli.app import main
from itconv_fast.ops import _extension

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


_REGISTER_LIMITS = {"default": 3, "avx2": 7, "avx512f": 16}
_ISA_ORDER = ["default", "avx2", "avx512f"]


def _cpu_flags_widest() -> str:
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    return "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "default"


def test_isa_and_register_limit_follow_the_cpu():
    # one path on every machine: the expected clone is computed from /proc/cpuinfo, not branched on
    info = _extension.cpu_info()
    expected = "default" if info["vector_clones"].startswith("none") else _cpu_flags_widest()
    assert info["detected_isa"] == expected
    assert (info["isa"], info["widest_isa"]) == (expected, expected)
    assert info["register_limit"] == _REGISTER_LIMITS[expected]


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


@pytest.mark.parametrize(
    "env",
    [
        {"ITCONV_FAST_CPU_ISA": "default"},
        {"ITCONV_FAST_CPU_ISA": "avx2"},
        {"ITCONV_FAST_CPU_ISA": "avx2", "ITCONV_FAST_REGISTER_LIMIT": "16"},
        {"ITCONV_FAST_L1": "49152,12"},
        {"ITCONV_FAST_REGISTER_LIMIT": "0"},
    ],
    ids=["default-isa", "avx2", "avx2-limit16", "icelake-l1", "no-register-path"],
)
def test_every_clone_and_tuning_couples_bit_exactly(env):
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["exact"]
    info = report["info"]
    widest = _extension.cpu_info()["widest_isa"]
    requested = env.get("ITCONV_FAST_CPU_ISA", widest)
    expected = _ISA_ORDER[min(_ISA_ORDER.index(requested), _ISA_ORDER.index(widest))]  # a wider one is refused
    assert info["isa"] == expected
    if "ITCONV_FAST_REGISTER_LIMIT" not in env:
        assert info["register_limit"] == _REGISTER_LIMITS[expected]
    if "ITCONV_FAST_REGISTER_LIMIT" in env:
        assert info["register_limit"] == int(env["ITCONV_FAST_REGISTER_LIMIT"])
    if "ITCONV_FAST_L1" in env:
        assert (info["l1d_bytes"], info["l1d_ways"], info["l1d_sets"], info["l1d_source"]) == (
            49152,
            12,
            64,
            "ITCONV_FAST_L1",
        )


def _child_cpu_info(env: dict) -> dict:
    code = "import json; from itconv_fast.ops import _extension; print(json.dumps(_extension.cpu_info()))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("widest", _ISA_ORDER)
def test_a_wider_isa_than_the_cpu_has_is_refused(widest):
    """ITCONV_FAST_CPU_WIDEST narrows what the CPU offers, so the refusal runs on every machine (an AVX-512 one
    too): a clone wider than the widest is refused and the widest runs instead."""
    detected = _extension.cpu_info()["detected_isa"]
    capped = _ISA_ORDER[min(_ISA_ORDER.index(widest), _ISA_ORDER.index(detected))]
    info = _child_cpu_info({"ITCONV_FAST_CPU_WIDEST": widest, "ITCONV_FAST_CPU_ISA": "avx512f"})
    assert (info["widest_isa"], info["detected_isa"]) == (capped, detected)
    assert info["isa"] == capped and info["register_limit"] == _REGISTER_LIMITS[capped]


def test_the_widest_cap_never_widens():
    detected = _extension.cpu_info()["detected_isa"]
    info = _child_cpu_info({"ITCONV_FAST_CPU_WIDEST": "avx512f"})
    assert info["widest_isa"] == info["isa"] == detected
