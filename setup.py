"""Packaging. `kernels/` installs as `ptqrt.kernels` and `csrc/` ships as `ptqrt._csrc` (for
just-in-time builds from a wheel). PTQRT_BUILD_EXT=1 builds the C++ CPU extension ahead of time,
and the CUDA extension too when torch has CUDA and nvcc is found."""
import os

from setuptools import setup

PACKAGES = ["ptqrt", "ptqrt.algorithms", "ptqrt.modules", "ptqrt.integrations"]
PACKAGE_DIR = {}
for pkg, folder in (("ptqrt.kernels", "kernels"), ("ptqrt._csrc", "csrc")):
    if os.path.isdir(folder):
        PACKAGES.append(pkg)
        PACKAGE_DIR[pkg] = folder
kwargs = dict(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"ptqrt": ["data/*.txt", "data/*.json", "data/tables/*.json", "data/tiny_lm/*"], "ptqrt._csrc": ["*/*.cpp", "*/*.cu", "*/*.h", "*/*.cuh", "*/*/*.h", "*/*/*.cuh", "*.h"]},
)

if os.environ.get("PTQRT_BUILD_EXT", "0") == "1":
    import glob

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    from ptqrt import _build  # noqa: E402  (reads flags and sources from one place)

    exts = [CppExtension("ptqrt._C_cpu", sorted(glob.glob("csrc/cpu/*.cpp")), include_dirs=["csrc"],
                         extra_compile_args=_build.CPU_CFLAGS, extra_link_args=_build.CPU_LDFLAGS)]
    if _build.cuda_unavailable_reason() is None and glob.glob("csrc/cuda/*.cu"):
        exts.append(CUDAExtension("ptqrt._C_cuda", sorted(glob.glob("csrc/cuda/*.c*")),
                                  include_dirs=["csrc", *_build.nvidia_includes()],
                                  extra_compile_args={"cxx": _build.CUDA_CFLAGS, "nvcc": _build.CUDA_NVCCFLAGS}))
    kwargs.update(ext_modules=exts, cmdclass={"build_ext": BuildExtension})

setup(**kwargs)
