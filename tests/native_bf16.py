"""Whether this machine runs bf16 natively, read the way the product decides it
(features/backbones.native_precision), so that a test can assert the outcome the product must give
here: a visible NVIDIA GPU decides when there is one (every card of compute capability 8.0 or
more); else the CPU flags amx_bf16 or avx512_bf16 in /proc/cpuinfo."""

from __future__ import annotations

BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    raise AssertionError("no flags line in /proc/cpuinfo")


def runs_bf16_natively() -> bool:
    from leukoflow.features.backbones import BF16_MIN_COMPUTE_CAPABILITY, gpu_compute_capabilities

    gpus = gpu_compute_capabilities()
    if gpus:
        return all(c >= BF16_MIN_COMPUTE_CAPABILITY for c in gpus)
    return bool(BF16_CPU_FLAGS & cpuinfo_flags())


def native_precision() -> str:
    return "bf16" if runs_bf16_natively() else "fp32"
