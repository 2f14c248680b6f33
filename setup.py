"""Builds mcsmoe_fast._C: CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present. MCSMOE_FAST_CUDA=0 forces a CPU-only build, MCSMOE_FAST_CUDA=1 requires CUDA.

Install with `pip install --no-build-isolation .` (build isolation would pull a multi-GB torch)."""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - a message for people who forgot --no-build-isolation
    raise SystemExit(
        "mcsmoe-fast builds against the installed torch: install torch first, then "
        "`pip install --no-build-isolation .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("MCSMOE_FAST_CUDA")
    available = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "1" and not available:
        raise SystemExit(
            f"MCSMOE_FAST_CUDA=1 but CUDA cannot be built: CUDA_HOME={CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
        )
    return available if flag is None else flag == "1"


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


with_cuda = want_cuda()
cpp_sources = ["csrc/bindings.cpp"] + sources("csrc/ops/*.cpp") + sources("csrc/kernels/*.cpp")
cxx_flags = ["-O3", "-g0", "-fopenmp", "-DNDEBUG"]
define_macros = []
if with_cuda:
    cuda_sources = sources("csrc/kernels/*.cu") + sources("csrc/ops/cuda/*.cpp")
    define_macros.append(("MCSMOE_WITH_CUDA", "1"))
    ext = CUDAExtension(
        "mcsmoe_fast._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
    )
else:
    ext = CppExtension(
        "mcsmoe_fast._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )

setup(
    packages=find_packages(include=["mcsmoe_fast", "mcsmoe_fast.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
