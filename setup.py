"""Build of itconv_fast._C, the C++/CUDA extension (and itconv_fast._device_emulation, its CUDA device code
compiled for the CPU tests).

C++ CPU sources are always compiled. CUDA sources are compiled when a CUDA toolkit and a CUDA build
of torch are present; ITCONV_FAST_CUDA=1 forces them on (fail if impossible), ITCONV_FAST_CUDA=0 off.
Without a visible GPU the arch list defaults to DEFAULT_CUDA_ARCH_LIST (TORCH_CUDA_ARCH_LIST overrides it). Build with
`pip install --no-build-isolation .` so the extension is compiled against the torch that runs it.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile


def _is_toolkit(home) -> bool:
    """A CUDA toolkit: nvcc, the runtime's header and the runtime library to link (/usr/local, where a wrapper
    nvcc may sit beside a lib folder, is not one)."""
    if not home or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return False
    headers = [os.path.join(home, "include", "cuda_runtime.h")] + glob.glob(
        os.path.join(home, "targets", "*", "include", "cuda_runtime.h")
    )
    libraries = [
        p
        for d in ("lib64", "lib", os.path.join("targets", "*", "lib"))
        for p in glob.glob(os.path.join(home, d, "libcudart.so*"))
    ]
    return any(os.path.isfile(h) for h in headers) and bool(libraries)


def find_cuda_home():
    """The CUDA toolkit the way users have it: CUDA_HOME (or CUDA_PATH); the toolkit that `nvcc` on PATH really
    runs, also when that nvcc is a wrapper script outside the toolkit (nvcc --dryrun names its own folder); then
    /usr/local/cuda. None when there is none. torch.utils.cpp_extension guesses from nvcc's folder alone, and a
    wrapper in /usr/local/bin made it guess /usr/local, where no libcudart is: the link failed."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(home):
            return home
        try:
            with tempfile.TemporaryDirectory() as folder:
                probe = os.path.join(folder, "probe.cu")
                open(probe, "w").close()
                out = subprocess.run(
                    [nvcc, "--dryrun", "-c", probe, "-o", os.path.join(folder, "probe.o")],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
            found = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
            if found and _is_toolkit(os.path.dirname(os.path.normpath(found.group(1)))):
                return os.path.dirname(os.path.normpath(found.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


_cuda_home = find_cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home  # read by torch.utils.cpp_extension when it is imported, just below

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0;10.0;12.0+PTX"


def cuda_forced() -> bool:
    return os.environ.get("ITCONV_FAST_CUDA", "auto").lower() in ("1", "true", "on", "yes")


# Why the CUDA kernels are not in the build, when they are not; written to the record when the extension is built
# (BuildWithCPUFallback), not when setup.py is imported: an sdist build imports it too, builds nothing, and must
# not overwrite the record of the build that is installed (`itconv-fast info` read "not built" after one).
CPU_ONLY_REASON = {"reason": ""}


def want_cuda() -> bool:
    flag = os.environ.get("ITCONV_FAST_CUDA", "auto").lower()
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if flag in ("0", "false", "off", "no"):
        CPU_ONLY_REASON["reason"] = "ITCONV_FAST_CUDA=0"
        return False
    if flag in ("1", "true", "on", "yes"):
        if not available:
            raise RuntimeError("ITCONV_FAST_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found")
        return True
    if not available:
        CPU_ONLY_REASON["reason"] = (
            "no CUDA toolkit was found (CUDA_HOME, nvcc on PATH, /usr/local/cuda)"
            if CUDA_HOME is None
            else f"torch {torch.__version__} is not a CUDA build"
        )
    return available


CUDA_RECORD = os.path.join("itconv_fast", "_cuda_build.txt")


def record_cuda_build(built: bool, reason: str = "", build_lib: str = None) -> None:
    """itconv_fast/_cuda_build.txt: whether the CUDA kernels were built and, if not, why (`itconv-fast info`).
    Written into the source tree (editable installs) and, during build_ext, into the build folder (wheels)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in [here] + ([build_lib] if build_lib and os.path.isdir(os.path.join(build_lib, "itconv_fast")) else []):
        with open(os.path.join(root, CUDA_RECORD), "w", encoding="utf-8") as f:
            f.write(("built" if built else f"not built: {reason}") + "\n")


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
        {
            os.path.dirname(h)
            for root in nvidia.__path__
            for h in glob.glob(os.path.join(root, "*", "include", "cusparse.h"))
        }
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
        ext = CUDAExtension("itconv_fast._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
        ext.cpu_fallback = CppExtension(
            "itconv_fast._C",
            [s for s in sources if not s.endswith(".cu")],
            extra_compile_args={"cxx": [f for f in cxx if "CUDA" not in f]},
            **kwargs,
        )
        return ext
    return CppExtension("itconv_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


def nvcc_failure(cuda_home) -> str:
    """Why the toolkit's nvcc cannot compile a one-line kernel ("" when it can): a broken toolkit is found in
    seconds, before the C++ sources are compiled for a CUDA build that would fail at its first .cu file."""
    nvcc = os.path.join(cuda_home or "", "bin", "nvcc")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        with open(source, "w", encoding="utf-8") as f:
            f.write("__global__ void probe(float *x) { x[0] = 1.0f; }\n")
        try:
            out = subprocess.run(
                [nvcc, "-c", source, "-o", os.path.join(tmp, "probe.o")], capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"nvcc cannot compile a test kernel ({exc})"
    if out.returncode == 0:
        return ""
    lines = (out.stderr + out.stdout).strip().splitlines()
    return f"nvcc cannot compile a test kernel ({lines[-1][:160] if lines else f'exit status {out.returncode}'})"


class BuildWithCPUFallback(BuildExtension):
    """A build that cannot fail for want of CUDA: when the CUDA half of itconv_fast._C does not compile or link
    (and ITCONV_FAST_CUDA=1 did not demand it), the extension is built again with its CPU kernels only, one line
    says why, and itconv_fast/_cuda_build.txt records it for `itconv-fast info`."""

    def build_extension(self, ext):
        fallback = getattr(ext, "cpu_fallback", None)
        if fallback is None:
            super().build_extension(ext)
            if ext.name == "itconv_fast._C":  # built without CUDA by choice or for want of a toolkit
                record_cuda_build(False, CPU_ONLY_REASON["reason"], self.build_lib)
            return
        reason = nvcc_failure(CUDA_HOME)
        if reason and cuda_forced():
            raise RuntimeError(f"ITCONV_FAST_CUDA=1 but {reason}")
        try:
            if reason:
                raise RuntimeError(reason)
            super().build_extension(ext)
        except Exception as exc:  # a compile or link error of the CUDA sources, or of the CUDA-enabled C++ ones
            if cuda_forced():
                raise
            text = str(exc).strip()
            if "-shared" in text:  # the compiler's or linker's own message is already on stderr, above this line
                reason = "linking failed"
            elif "compiling" in text.lower():
                reason = "compiling failed"
            else:
                reason = text.splitlines()[-1][:200] if text else type(exc).__name__
            print(
                f"itconv-fast: the CUDA kernels could not be built ({reason[:200]}); building the CPU kernels "
                "only. Set CUDA_HOME to a full CUDA toolkit (and ITCONV_FAST_CUDA=1 to make this an error) to get "
                "them.",
                file=sys.stderr,
                flush=True,
            )
            # The flags BuildExtension added to the CUDA extension (ABI, extension name) apply to the CPU build too.
            fallback.extra_compile_args["cxx"] = [f for f in ext.extra_compile_args["cxx"] if "CUDA" not in f]
            for key, value in vars(ext).items():  # what build_ext.finalize_options set on it (_needs_stub, ...)
                if key.startswith("_") and not hasattr(fallback, key):
                    setattr(fallback, key, value)
            super().build_extension(fallback)
            record_cuda_build(False, f"the CUDA build failed ({reason[:200]})", self.build_lib)
        else:
            record_cuda_build(True, "", self.build_lib)


def emulation_extension():
    """itconv_fast._device_emulation: the CUDA kernels' device code compiled for the CPU under the CUDA shim
    (csrc/emulation), which the tests execute against the references. No CUDA toolkit needed."""
    here = os.path.dirname(os.path.abspath(__file__))
    return CppExtension(
        "itconv_fast._device_emulation",
        [os.path.join("csrc", "emulation", "device_emulation.cpp")],
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O2", "-ffp-contract=off"]},
    )


if __name__ == "__main__":  # (setuptools runs this file as __main__; tests import its helpers)
    setup(
        ext_modules=[extension(), emulation_extension()],
        cmdclass={"build_ext": BuildWithCPUFallback.with_options(use_ninja=True)},
    )
