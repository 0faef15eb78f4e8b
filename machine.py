"""What this machine computes with: CPU model and instruction-set class, cores, GPU.

Speed depends on the machine class far more than on anything else (a CPU with
AMX runs bfloat16 convolutions several times faster than an AVX2-only one), so
every speed figure, every expected time in a plan and every measured throughput
is labelled with :func:`machine_key`. Emulation counts: with
``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` capping the instruction set,
the class is the emulated one.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict

import torch

from model import ONEDNN_NO_CAP, cpu_computes_bf16, cpuinfo_field, onednn_isa_cap, select_device


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's word for it."""
    name = cpuinfo_field("model name")
    if name:
        return name
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def isa_class() -> str:
    """'amx', 'avx512-bf16', 'avx512', 'avx2' or 'other': what torch and oneDNN use here now."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    onednn_cap = onednn_isa_cap()
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    if onednn_cap.startswith(("AVX2", "AVX", "SSE")) and not onednn_cap.startswith("AVX512") \
            and not onednn_cap.startswith("AVX10"):
        return "avx2" if onednn_cap.startswith("AVX2") else "other"  # convolutions run at the cap
    if capability.startswith("AVX512"):
        if cpu_computes_bf16():
            return "amx" if amx and (onednn_cap in ONEDNN_NO_CAP or "AMX" in onednn_cap) else "avx512-bf16"
        return "avx512"
    return "avx2" if capability.startswith("AVX2") else "other"


def describe_machine(device: str = "") -> Dict[str, str]:
    """The facts printed beside a speed figure: CPU model, ISA class, cores (threads torch uses), GPU."""
    chosen = select_device(device or None)
    gpu = torch.cuda.get_device_name(chosen) if chosen.type == "cuda" else "none used"
    return {"cpu": cpu_model(), "isa": isa_class(), "threads": str(torch.get_num_threads()), "gpu": gpu}


def machine_key(device: str = "") -> str:
    """One line naming the machine class a throughput was measured on (the key of recorded speeds)."""
    facts = describe_machine(device)
    if facts["gpu"] != "none used":
        return f"GPU {facts['gpu']}"
    return f"{facts['cpu']} ({facts['isa']}, {facts['threads']} threads)"


# Environment that makes torch and oneDNN use at most one instruction-set class, to measure what a
# machine of that class gets on a newer one (emulation only caps: it cannot add what the CPU lacks).
ISA_ENVIRONMENTS: Dict[str, Dict[str, str]] = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"},
    "avx512-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "ATEN_CPU_CAPABILITY": "avx512"},
    "amx": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX", "ATEN_CPU_CAPABILITY": "avx512"},
    "native": {},
}


# The CPU flags (Linux /proc/cpuinfo) each class needs: a cap above them makes torch run instructions
# the CPU lacks (seen: ATEN_CPU_CAPABILITY=avx512 on an AVX2 part dies of an illegal instruction).
ISA_FLAGS = {"avx2": ("avx2",), "avx512": ("avx512f",), "avx512-bf16": ("avx512f", "avx512_bf16"),
             "amx": ("avx512f", "amx_tile", "amx_bf16"), "native": ()}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux), or an empty set where /proc/cpuinfo cannot be read."""
    return frozenset((cpuinfo_field("flags") or "").split())


def can_emulate(isa: str) -> bool:
    """True where this CPU has every instruction of ``isa`` (unknown flags: only 'native')."""
    return isa == "native" or set(ISA_FLAGS[isa]) <= cpu_flags()


def emulation_environment(isa: str, base: Dict[str, str]) -> Dict[str, str]:
    """``base`` (e.g. ``os.environ``) with the caps of ``isa`` (:data:`ISA_ENVIRONMENTS`), for a child
    process; 'native' removes any cap ``base`` carries. A class this CPU lacks is a ValueError (a cap
    can only lower the instruction set)."""
    if isa not in ISA_ENVIRONMENTS:
        raise ValueError(f"isa must be one of {', '.join(ISA_ENVIRONMENTS)}, got '{isa}'.")
    if not can_emulate(isa):
        raise ValueError(f"this CPU ({cpu_model()}) lacks {', '.join(ISA_FLAGS[isa])}: {isa} cannot be emulated "
                         "here (a cap only lowers the instruction set).")
    environment = {k: v for k, v in base.items()
                   if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    environment.update(ISA_ENVIRONMENTS[isa])
    return environment
