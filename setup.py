"""Build of itconv_fast._C, the C++/CUDA extension (and itconv_fast._device_emulation, its CUDA device code
compiled for the CPU tests).

C++ CPU sources are always compiled. CUDA sources are compiled when a CUDA toolkit and a CUDA build
of torch are present; ITCONV_FAST_CUDA=1 forces them on (fail if impossible), ITCONV_FAST_CUDA=0 off.
Without a visible GPU the arch list defaults to DEFAULT_CUDA_ARCH_LIST (TORCH_CUDA_ARCH_LIST overrides it). Build with
`pip install --no-build-isolation .` so the extension is compiled against the torch that runs it.
"""

import glob
import os
import subprocess

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


DEFAULT_CUDA_ARCH_LIST = "8.0;9.0;10.0;12.0+PTX"


def want_cuda() -> bool:
    flag = os.environ.get("ITCONV_FAST_CUDA", "auto").lower()
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if flag in ("0", "false", "off", "no"):
        return False
    if flag in ("1", "true", "on", "yes"):
        if not available:
            raise RuntimeError(
                "ITCONV_FAST_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found"
            )
        return True
    return available


def wheel_cuda_include_dirs() -> list[str]:
    """Header folders of the CUDA libraries that ship inside torch's wheels (nvidia/*/include).

    torch's CUDA headers include e.g. cusparse.h, which a bare CUDA toolkit may lack; those folders are
    searched after the toolkit's own (-idirafter), so the toolkit's headers always win.
    """
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(
        {os.path.dirname(h) for root in nvidia.__path__ for h in glob.glob(os.path.join(root, "*", "include", "cusparse.h"))}
    )


def compiler_is_gcc() -> bool:
    """Whether the C++ compiler setuptools will call is GCC (some of our flags are GCC's own)."""
    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return False
    return "Free Software Foundation" in out  # GCC's --version banner; clang's has no such line


def extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp")))
    torch_version = torch.__version__.split("+")[0]
    # -ffp-contract=off: no fused multiply-adds, so the kernels round exactly like the reference.
    cxx = ["-O3", "-ffp-contract=off", f'-DITCONV_TORCH_VERSION="{torch_version}"']
    if compiler_is_gcc():
        # GCC's unroll-and-jam turned the coupling kernel's member loop into scalar code (measured
        # 3x slower); without it the loops vectorise as written.
        cxx.append("-fno-loop-unroll-and-jam")
    link = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is an inline OpenMP region in ATen's headers: without -fopenmp our kernels
        # would silently run on one thread. libgomp.so.1 resolves to the copy torch already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    kwargs = dict(include_dirs=[os.path.join(here, "csrc")], extra_link_args=link)
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch cannot detect an architecture without a visible GPU: native code for Ampere (8.x runs
            # sm_80), Hopper, Blackwell data-centre (10.0) and Blackwell workstation/consumer (12.0) GPUs, and
            # PTX of 12.0 that the driver compiles for anything newer.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        sources += sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "native").replace(";", ",").replace(" ", ",")
        cxx += ["-DITCONV_WITH_CUDA", f'-DITCONV_CUDA_ARCH_LIST="{arch_list}"']
        nvcc = ["-O3", "--fmad=false", "-DITCONV_WITH_CUDA", "--expt-relaxed-constexpr"]
        for folder in wheel_cuda_include_dirs():
            cxx += ["-idirafter", folder]
            nvcc += [f"-Xcompiler=-idirafter{folder}"]
        return CUDAExtension("itconv_fast._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension("itconv_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


def emulation_extension():
    """itconv_fast._device_emulation: the CUDA kernels' device code compiled for the CPU under the CUDA shim
    (csrc/emulation), which the tests execute against the references. No CUDA toolkit needed."""
    here = os.path.dirname(os.path.abspath(__file__))
    return CppExtension("itconv_fast._device_emulation", [os.path.join("csrc", "emulation", "device_emulation.cpp")],
                        include_dirs=[os.path.join(here, "csrc")],
                        extra_compile_args={"cxx": ["-O2", "-ffp-contract=off"]})


setup(
    ext_modules=[extension(), emulation_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
