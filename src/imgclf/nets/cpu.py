"""What this CPU can do for the network: native bf16 and int8 dot products (VNNI).

The one place imgclf asks. The machines imgclf runs on differ (some x86 CPUs have
AVX2 only, others AVX-512 with native bf16 and VNNI), and which precision ``auto``
may take depends on it, so both answers must be testable on any machine: set
``IMGCLF_CPU_CAPABILITIES`` to pretend (``bf16,vnni``, ``vnni``, ``bf16`` or
``none``). It is read here and nowhere else, on every call (cheap), so a test can
change it. Without it, Linux x86 answers from the CPU flags in ``/proc/cpuinfo``,
never importing OpenVINO; elsewhere OpenVINO's ``OPTIMIZATION_CAPABILITIES`` answer
(imported only then, and only if installed).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from imgclf.errors import OptionError

OVERRIDE_ENV = "IMGCLF_CPU_CAPABILITIES"
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_NAMES = ("bf16", "vnni")


@dataclass(frozen=True)
class CpuCapabilities:
    """Native bf16 and VNNI on this CPU, and where the answer came from."""

    bf16: bool
    vnni: bool
    source: str  # "cpu flags", "OpenVINO", "IMGCLF_CPU_CAPABILITIES", "unknown"

    @property
    def key(self) -> str:
        """The capabilities as recorded beside a measurement: ``bf16+vnni``, ``vnni``, ``bf16`` or ``none``."""
        return "+".join(n for n in _NAMES if getattr(self, n)) or "none"

    def describe(self) -> str:
        said = ", ".join(f"{'' if getattr(self, n) else 'no '}native {n}" for n in _NAMES)
        return f"{said} ({self.source})"

    def to_dict(self) -> dict:
        return {"bf16": self.bf16, "vnni": self.vnni, "key": self.key, "source": self.source, "name": cpu_name()}


def parse_capabilities(text: str) -> tuple[bool, bool]:
    """``bf16,vnni`` -> (True, True); ``none`` -> (False, False); raises on anything else."""
    words = {w.strip().lower() for w in text.replace("+", ",").split(",") if w.strip()}
    unknown = words - {*_NAMES, "none"}
    if unknown or ("none" in words and len(words) > 1):
        raise OptionError(f"{OVERRIDE_ENV}={text!r}: use a comma-separated list of bf16, vnni, or none")
    return "bf16" in words, "vnni" in words


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags on Linux x86; None where unknown."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


@functools.cache
def _openvino_capabilities() -> tuple[str, ...]:
    if importlib.util.find_spec("openvino") is None:
        return ()
    import openvino

    return tuple(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def cpu_capabilities() -> CpuCapabilities:
    """This CPU's capabilities (or the ones ``IMGCLF_CPU_CAPABILITIES`` pretends)."""
    override = os.environ.get(OVERRIDE_ENV, "").strip()
    if override:  # set but empty is unset, as a shell's VAR= is (it silently meant "none")
        return CpuCapabilities(*parse_capabilities(override), OVERRIDE_ENV)
    flags = _cpu_flags()
    if flags is not None:
        return CpuCapabilities(bool(flags & _BF16_FLAGS), bool(flags & _VNNI_FLAGS), "cpu flags")
    caps = _openvino_capabilities()
    if caps:
        return CpuCapabilities("BF16" in caps, "INT8" in caps, "OpenVINO")
    return CpuCapabilities(False, False, "unknown")


@functools.cache
def cpu_name() -> str:
    """The CPU's model name, for reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
