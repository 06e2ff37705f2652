"""Optional compiled CPU kernels, built once with torch.utils.cpp_extension; pure-PyTorch fallbacks otherwise."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).parent


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


SOURCES = ("module.cpp", "qlinear.cpp", "decode.cpp", "int8_rows.cpp", "int8_experts.cpp", "attention_softmax.cpp",
           "vnni_gemm.cpp", "paged_attention.cpp", "cross_entropy.cpp",
           "causal_attention.cpp", "rms_norm.cpp", "swiglu.cpp", "moe_experts.cpp",
           "rope.cpp", "argmax_rows.cpp")


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled `hanlin_cpu` extension, or None (no AVX2/compiler, or HANLIN_NO_KERNELS=1)."""
    if os.environ.get("HANLIN_NO_KERNELS") == "1" or not _cpu_has_avx2_fma():
        return None
    # The ninja that pip installs lives beside the interpreter, which need not be on PATH (a venv not
    # activated); widen PATH only while building, not for the rest of the user's process.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), path])
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="hanlin_cpu",
            sources=[str(SOURCE_DIR / name) for name in SOURCES],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # a missing compiler or headers must never stop inference
        log.warning("compiled CPU kernels unavailable, using the PyTorch fallback: %s", error)
        return None
    finally:
        os.environ["PATH"] = path
