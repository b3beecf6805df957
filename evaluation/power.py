"""Jetson power and memory telemetry for bench: power per rail, total power, peak memory in use.

Sources, the first one found is used:

- `tegrastats` (JetPack 5, 6 and 7): one line per sample with `RAM used/totalMB` and each power
  rail as `NAME currentmW/averagemW` (NVIDIA's Jetson Linux guide, "tegrastats Utility").
- the INA3221 power monitors in sysfs (`/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/`:
  `in<N>_label`, `in<N>_input` in mV, `curr<N>_input` in mA), readable without root; no memory.
- neither (not a Jetson): every telemetry column says so.

Which rail is the total differs by board: Orin Nano and NX report their module input (`VDD_IN`),
Thor its board input (`VIN`); AGX Orin has no input rail, so the total there is the sum of the
module rails (`VDD_GPU_SOC`, `VDD_CPU_CV`, `VIN_SYS_5V0`, ...), which reads below a meter at the
supply. The summary names the rail (or "sum of rails") it used.

Memory on a Jetson is one pool for CPU and GPU, so tegrastats' RAM in use (the whole system's,
other processes included) is the unified-memory figure; bench reports its peak during the run.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

INPUT_RAILS = ("VDD_IN", "VIN")  # a board's or module's input rail, when it reports one
INA3221_GLOB = "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
INTERVAL_MS = 100
NOT_A_JETSON = "n/a: no tegrastats or INA3221 rails on this machine"

_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")


@dataclass
class Sample:
    rails_mw: dict[str, float]  # instantaneous power per rail
    ram_used_mb: float | None = None


def parse_tegrastats(line: str) -> Sample | None:
    """One tegrastats line -> its rails and RAM in use; None for a line without power rails."""
    rails = {name: float(now) for name, now, _average in _RAIL.findall(line)}
    if not rails:
        return None
    ram = _RAM.search(line)
    return Sample(rails, float(ram.group(1)) if ram else None)


def read_ina3221(roots: list[str]) -> Sample | None:
    """One reading of every labelled INA3221 channel under the hwmon directories `roots`."""
    rails = {}
    for root in roots:
        for label_path in sorted(glob.glob(os.path.join(root, "in*_label"))):
            channel = os.path.basename(label_path)[2:].split("_")[0]
            try:
                with open(label_path) as f:
                    label = f.read().strip()
                with open(os.path.join(root, f"in{channel}_input")) as f:
                    millivolts = float(f.read())
                with open(os.path.join(root, f"curr{channel}_input")) as f:
                    milliamps = float(f.read())
            except (OSError, ValueError):
                continue  # a channel without a reading (disconnected, or no permission)
            rails[label] = millivolts * milliamps / 1000.0
    return Sample(rails) if rails else None


@dataclass
class PowerMonitor:
    """Samples in the background between start() and stop(); stop() returns the summary.

    tegrastats: the command found on PATH (or given); sysfs: the hwmon directories to read."""

    tegrastats: str | None = None
    sysfs: list[str] | None = None
    interval_ms: int = INTERVAL_MS
    samples: list[Sample] = field(default_factory=list)

    @classmethod
    def detect(cls) -> PowerMonitor:
        tool = shutil.which("tegrastats") or (
            "/usr/bin/tegrastats" if os.access("/usr/bin/tegrastats", os.X_OK) else None
        )
        return cls(tegrastats=tool, sysfs=None if tool else sorted(glob.glob(INA3221_GLOB)))

    @property
    def source(self) -> str | None:
        if self.tegrastats:
            return "tegrastats"
        return "ina3221" if self.sysfs else None

    def start(self) -> None:
        self.samples, self._stop = [], threading.Event()
        self._started = time.perf_counter()
        if self.tegrastats:
            self._proc = subprocess.Popen(
                [self.tegrastats, "--interval", str(self.interval_ms)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read_tegrastats, daemon=True)
        else:
            self._thread = threading.Thread(target=self._read_sysfs, daemon=True)
        if self.source:
            self._thread.start()

    def stop(self) -> dict[str, Any]:
        if not hasattr(self, "_stop"):  # never started
            return summarize([], self.source, 0.0)
        duration = time.perf_counter() - self._started
        self._stop.set()
        if self.tegrastats:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self.source:
            self._thread.join(timeout=5)
        return summarize(self.samples, self.source, duration)

    def _read_tegrastats(self) -> None:
        for line in self._proc.stdout:
            sample = parse_tegrastats(line)
            if sample:
                self.samples.append(sample)

    def _read_sysfs(self) -> None:
        while not self._stop.wait(self.interval_ms / 1000):
            sample = read_ina3221(self.sysfs or [])
            if sample:
                self.samples.append(sample)


def summarize(samples: list[Sample], source: str | None, duration_s: float) -> dict[str, Any]:
    """Mean power per rail and in total (W), energy over `duration_s` (J), peak RAM in use (MB)."""
    if not source or not samples:
        reason = NOT_A_JETSON if not source else f"n/a: {source} gave no sample in {duration_s:.1f} s"
        return {"source": source, "available": False, "reason": reason}
    names = sorted({name for s in samples for name in s.rails_mw})
    rails_w = {n: sum(s.rails_mw.get(n, 0.0) for s in samples) / len(samples) / 1000 for n in names}
    total_rail = next((r for r in INPUT_RAILS if r in rails_w), None)
    total_w = rails_w[total_rail] if total_rail else sum(rails_w.values())
    ram = [s.ram_used_mb for s in samples if s.ram_used_mb is not None]
    return {
        "source": source,
        "available": True,
        "samples": len(samples),
        "rails_w": rails_w,
        "total_w": total_w,
        "total_rail": total_rail or "sum of rails",
        "energy_j": total_w * duration_s,
        "duration_s": duration_s,
        "peak_ram_mb": max(ram) if ram else None,
    }
