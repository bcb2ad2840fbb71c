"""Build the moe package: the C core (csrc/) and its one NumPy binding file.

All csrc/*.c files go into one extension, moe._C.  The CPU tile kernels are
compiled for several instruction sets (by #pragma in their files) and chosen
at run time, so the build never assumes the build machine's CPU.
"""
import glob
import os
import sys

import numpy as np
from setuptools import Extension, setup


def c_flags():
    if sys.platform == "win32":
        return ["/O2"]
    flags = ["-O3", "-std=gnu11", "-fvisibility=hidden", "-Wall", "-Wextra",
             "-Wno-unused-parameter"]
    # MOE_SANITIZE=1 builds for AddressSanitizer + UBSan (tests in CI).
    if os.environ.get("MOE_SANITIZE") == "1":
        flags += ["-O1", "-g", "-fno-omit-frame-pointer",
                  "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined"]
    return flags


def link_flags():
    if os.environ.get("MOE_SANITIZE") == "1":
        return ["-fsanitize=address,undefined"]
    return []


sources = sorted(glob.glob("csrc/*.c"))
ext = Extension(
    "moe._C",
    sources=sources,
    depends=glob.glob("csrc/*.h") + glob.glob("csrc/*.inc"),
    include_dirs=[np.get_include(), "csrc"],
    define_macros=[("NPY_TARGET_VERSION", "NPY_1_22_API_VERSION")],
    extra_compile_args=c_flags(),
    extra_link_args=link_flags(),
    libraries=[] if sys.platform == "win32" else ["m"],
)

setup(ext_modules=[ext])
