"""machine.py: the CPU class torch and oneDNN use, and the emulation of an older class in a child process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import machine

REPO = Path(__file__).resolve().parents[1]
PROBE = ("import sys; sys.path.insert(0, sys.argv[1]); import machine, model, torch; "
         "print(machine.isa_class(), torch.backends.cpu.get_cpu_capability(), model.cpu_computes_bf16())")


def probe(environment):
    result = subprocess.run([sys.executable, "-c", PROBE, str(REPO)], env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.skipif(not machine.can_emulate("avx2"), reason="not an x86 CPU with AVX2")
def test_avx2_emulation_is_what_a_real_avx2_part_reports():
    isa, capability, bf16 = probe(machine.emulation_environment("avx2", dict(os.environ)))
    assert (isa, capability, bf16) == ("avx2", "AVX2", "False")


def test_native_removes_any_cap():
    capped = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    environment = machine.emulation_environment("native", capped)
    assert "ONEDNN_MAX_CPU_ISA" not in environment and "ATEN_CPU_CAPABILITY" not in environment
    isa, _, _ = probe(environment)
    assert isa == machine.isa_class() or os.environ.get("ONEDNN_MAX_CPU_ISA")


def test_a_class_the_cpu_lacks_is_refused_before_any_child_runs():
    missing = [isa for isa in machine.ISA_ENVIRONMENTS if not machine.can_emulate(isa)]
    if not missing:
        pytest.skip("this CPU has every class (AMX)")
    with pytest.raises(ValueError, match="cannot be emulated here"):
        machine.emulation_environment(missing[0], dict(os.environ))
    with pytest.raises(ValueError, match="isa must be one of"):
        machine.emulation_environment("sse2", dict(os.environ))


def test_describe_machine_names_cpu_class_and_threads():
    facts = machine.describe_machine("cpu")
    assert facts["cpu"] == machine.cpu_model() and facts["isa"] in ("amx", "avx512-bf16", "avx512", "avx2", "other")
    assert int(facts["threads"]) >= 1 and facts["gpu"] == "none used"
    assert machine.machine_key("cpu").startswith(facts["cpu"])
