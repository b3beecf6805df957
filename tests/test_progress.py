"""Progress on a terminal is a tqdm bar; in a file or a CI log it is a plain line now and then."""

import os
import subprocess
import sys

from tests.conftest import REPO, export_lively


def test_off_a_terminal_progress_is_lines_not_carriage_returns():
    code = (
        "import time\n"
        "from core.progress import progress\n"
        "bar = progress(total=4, desc='work', unit='step', every=0.05)\n"
        "for _ in range(4):\n"
        "    time.sleep(0.06); bar.update(1)\n"
        "bar.set_postfix(loss='0.5'); bar.close()\n"
        "print(sum(progress(range(3), desc='sum')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = r.stderr.splitlines()
    assert 2 <= len([x for x in lines if x.startswith("work: ")]) <= 5, lines
    assert lines[-2].startswith("work: 4/4 step") and "loss=0.5" in lines[-2]
    assert lines[-1].startswith("sum: 3/3") and r.stdout.strip() == "3"


def test_quantize_writes_no_carriage_returns_to_a_log(tiny_tokenizer_dir, tmp_path):
    bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path)[1]
    exe = os.path.join(os.path.dirname(sys.executable), "nanovlm-export")
    r = subprocess.run(
        [exe, "quantize", bundle, str(tmp_path / "q"), "--mode", "int8-static", "--samples", "8"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr and "calibration: recording graph inputs: 8/8 sample" in r.stderr
