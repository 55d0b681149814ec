"""Which kernels a run computes with, and the facts of the machine it ran on.

Why runs differ between machines (measured on an AMD EPYC with AVX-512; docs/guide/
interventions.md, "Determinism"): with one thread and deterministic algorithms a run is
bit-identical on reruns, but three libraries pick their kernels by the CPU's instruction set,
and each choice rounds differently:

- ATen's vectorised kernels (layer norm, softmax, GELU, AdamW's arithmetic, reductions):
  ``AVX512`` on a CPU with AVX-512 (AMD Zen 4, Intel Xeon since Skylake-SP), ``AVX2`` on one
  without (AMD Zen 2 and 3);
- MKL's BLAS and LAPACK under torch (every matrix product, ``svdvals``): its own dispatch,
  unless its conditional numerical reproducibility mode fixes a code path; on non-Intel
  CPUs only the ``AUTO`` and ``COMPATIBLE`` branches exist (Intel's MKL developer guide,
  "Getting Started with Conditional Numerical Reproducibility"), and only ``COMPATIBLE`` is
  one code path for every x86-64 CPU;
- numpy's OpenBLAS (the float64 CKA of the analysis): ``SkylakeX`` kernels with AVX-512,
  ``Haswell`` with AVX2 only (AMD Zen too).

Training amplifies one rounding difference into visibly different weights within a few
hundred updates (a rank-lowering regulariser, whose singular values come close to each other,
fastest), so two 2-core EPYCs of different generations gave different numbers.
:data:`PINNED_KERNELS` fixes all three choices: ATen's ``avx2`` kernels and numpy's ``Haswell``
kernels exist on every x86-64 CPU with AVX2 (Intel since 2013, AMD since 2017), MKL's
``COMPATIBLE`` branch on every x86-64 CPU. They are read when the libraries load, so
:func:`pin_kernels` must run before torch or numpy compute anything; :func:`machine_facts`
records what a run actually got.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

__all__ = ["PINNED_KERNELS", "machine_facts", "pin_kernels"]

#: Environment variables that fix the CPU kernels (see the module docstring).
PINNED_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "OPENBLAS_CORETYPE": "Haswell",
}
#: The torch CPU capability the pin yields on a CPU that has AVX2.
PINNED_CAPABILITY = "AVX2"


def pin_kernels() -> dict[str, str]:
    """Set :data:`PINNED_KERNELS` in this process's environment (overriding what is set) and
    return them. Effective only before torch and numpy load their kernels: call it first
    thing in a process; :func:`machine_facts` tells whether it took effect."""
    os.environ.update(PINNED_KERNELS)
    return dict(PINNED_KERNELS)


def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the model from platform, no flags
        pass
    return model, flags


def machine_facts(device: str) -> dict[str, Any]:
    """What a run's numbers depend on besides its config: CPU model and instruction sets, the
    kernels torch actually dispatches to, the pinned variables as this process has them,
    library versions, threads and (on CUDA) the GPU."""
    import numpy as np
    import torch
    import transformers

    model, flags = _cpu_model_and_flags()
    facts: dict[str, Any] = {
        "cpu": model,
        "cpu_avx2": "avx2" in flags if flags else None,
        "cpu_avx512f": "avx512f" in flags if flags else None,
        "machine": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **{name.lower(): os.environ.get(name) for name in PINNED_KERNELS},
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": device,
    }
    facts["kernels_pinned"] = (
        facts["torch_cpu_capability"] == PINNED_CAPABILITY
        and all(os.environ.get(k) == v for k, v in PINNED_KERNELS.items()))
    if device == "cuda" and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
        facts["cuda"] = torch.version.cuda
    return facts
