"""Jetson telemetry for bench (evaluation/power.py): tegrastats lines, INA3221 sysfs rails, totals.

No Jetson is reachable here, so no line below was recorded on a device: each is written for
this test in the layout NVIDIA's Jetson Linux guide documents for tegrastats (`RAM used/totalMB`,
each rail as `NAME currentmW/averagemW`), with the rail names those boards report (Orin Nano /
NX on JetPack 6: VDD_IN, VDD_CPU_GPU_CV, VDD_SOC; AGX Orin: VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0;
Thor on JetPack 7: VDD_GPU, VDD_CPU_SOC_MSS, VIN_SYS_5V0, VIN). The INA3221 tree is a directory
laid out as the hwmon driver lays it out.
"""

from __future__ import annotations

import time

import pytest

from evaluation.power import NOT_A_JETSON, PowerMonitor, parse_tegrastats, read_ina3221, summarize

ORIN_NANO = (
    "12-01-2026 10:15:02 RAM 2448/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [12%@1510,3%@1510,0%@1510,5%@1510,off,off] EMC_FREQ 9%@2133 GR3D_FREQ 61%@[624] "
    "NVENC off NVDEC off VIC off APE 174 cpu@49.1C soc2@47.8C soc0@48.2C gpu@50.3C tj@50.3C "
    "soc1@47.9C VDD_IN 6120mW/5980mW VDD_CPU_GPU_CV 2310mW/2250mW VDD_SOC 1530mW/1510mW"
)
AGX_ORIN = (
    "RAM 9120/30698MB (lfb 3x4MB) CPU [20%@2201,18%@2201,off,off] GR3D_FREQ 88%@[1300,1300] "
    "VDD_GPU_SOC 9600mW/9100mW VDD_CPU_CV 2400mW/2300mW VIN_SYS_5V0 4200mW/4100mW"
)
THOR = (
    "RAM 21530/125772MB (lfb 15x4MB) SWAP 0/0MB CPU [4%@2601,2%@2601,1%@2601] GPU 47% "
    "cpu@51.2C tj@52.0C VDD_GPU 18400mW/17900mW VDD_CPU_SOC_MSS 6510mW/6400mW "
    "VIN_SYS_5V0 6520mW/6500mW VIN 33100mW/32500mW"
)


@pytest.mark.parametrize(
    "line, rails, ram",
    [
        (ORIN_NANO, {"VDD_IN": 6120, "VDD_CPU_GPU_CV": 2310, "VDD_SOC": 1530}, 2448),
        (AGX_ORIN, {"VDD_GPU_SOC": 9600, "VDD_CPU_CV": 2400, "VIN_SYS_5V0": 4200}, 9120),
        (THOR, {"VDD_GPU": 18400, "VDD_CPU_SOC_MSS": 6510, "VIN_SYS_5V0": 6520, "VIN": 33100}, 21530),
    ],
)
def test_tegrastats_lines_give_instant_power_per_rail_and_ram(line, rails, ram):
    sample = parse_tegrastats(line + "\n")
    assert sample.rails_mw == rails and sample.ram_used_mb == ram  # the instant, not the running average


def test_lines_without_rails_are_not_samples():
    assert parse_tegrastats("") is None
    assert parse_tegrastats("RAM 2448/7620MB (lfb 2x4MB) CPU [1%@729] GR3D_FREQ 0%@[305]") is None


def test_total_is_the_input_rail_or_the_sum_of_rails():
    nano = summarize([parse_tegrastats(ORIN_NANO)] * 3, "tegrastats", 2.0)
    assert nano["total_rail"] == "VDD_IN" and nano["total_w"] == pytest.approx(6.12)
    assert nano["energy_j"] == pytest.approx(12.24) and nano["peak_ram_mb"] == 2448
    thor = summarize([parse_tegrastats(THOR)], "tegrastats", 1.0)
    assert thor["total_rail"] == "VIN" and thor["total_w"] == pytest.approx(33.1)
    agx = summarize([parse_tegrastats(AGX_ORIN)], "tegrastats", 1.0)
    assert agx["total_rail"] == "sum of rails" and agx["total_w"] == pytest.approx(9.6 + 2.4 + 4.2)
    # mean over samples per rail; peak RAM is the largest reading
    busy = parse_tegrastats(ORIN_NANO.replace("RAM 2448", "RAM 3000").replace("VDD_IN 6120", "VDD_IN 8120"))
    both = summarize([parse_tegrastats(ORIN_NANO), busy], "tegrastats", 1.0)
    assert both["rails_w"]["VDD_IN"] == pytest.approx(7.12) and both["peak_ram_mb"] == 3000


def _ina3221(root, channels):
    root.mkdir(parents=True)
    for n, (label, mv, ma) in enumerate(channels, 1):
        (root / f"in{n}_label").write_text(label + "\n")
        if mv is not None:
            (root / f"in{n}_input").write_text(f"{mv}\n")
        (root / f"curr{n}_input").write_text(f"{ma}\n")
    return str(root)


def test_ina3221_rails_from_sysfs(tmp_path):
    a = _ina3221(
        tmp_path / "1-0040/hwmon/hwmon3",
        [("VDD_IN", 5000, 1224), ("VDD_CPU_GPU_CV", 5000, 462), ("VDD_SOC", None, 300)],
    )
    sample = read_ina3221([a])
    assert sample.rails_mw == {"VDD_IN": pytest.approx(6120), "VDD_CPU_GPU_CV": pytest.approx(2310)}
    assert sample.ram_used_mb is None  # VDD_SOC has no voltage reading: skipped, not fatal
    assert read_ina3221([str(tmp_path / "missing")]) is None


def test_monitor_samples_sysfs_in_the_background(tmp_path):
    root = _ina3221(tmp_path / "hwmon0", [("VDD_IN", 5000, 1000)])
    monitor = PowerMonitor(sysfs=[root], interval_ms=20)
    assert monitor.source == "ina3221"
    monitor.start()
    deadline = time.monotonic() + 5
    while len(monitor.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    s = monitor.stop()
    assert s["available"] and s["samples"] >= 3 and s["total_w"] == pytest.approx(5.0)
    assert s["energy_j"] == pytest.approx(5.0 * s["duration_s"]) and s["peak_ram_mb"] is None


def test_no_telemetry_says_so():
    monitor = PowerMonitor(tegrastats=None, sysfs=[])
    assert monitor.source is None
    monitor.start()
    s = monitor.stop()
    assert s == {"source": None, "available": False, "reason": NOT_A_JETSON}
    assert PowerMonitor().stop()["reason"] == NOT_A_JETSON  # stopped without a start
