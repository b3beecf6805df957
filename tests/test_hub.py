"""A Hub id that is not cached fails within seconds offline, naming the fix (no model hub is
reachable from these machines: that is the case tested)."""

import time

import pytest

from core.hub import HubUnreachable, reachable
from core.processors import Tokenizer
from tests.conftest import tiny_config


def test_an_uncached_hub_id_offline_fails_fast_naming_the_fix():
    if reachable():
        pytest.skip("the Hub answers from this machine: the offline case cannot be shown here")
    t0 = time.perf_counter()
    with pytest.raises(
        HubUnreachable, match="point lm_tokenizer .* at a local folder holding tokenizer.json"
    ):
        Tokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", tiny_config())
    assert time.perf_counter() - t0 < 10


def test_an_uncached_checkpoint_id_offline_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    if reachable():
        pytest.skip("the Hub answers from this machine: the offline case cannot be shown here")
    exe = os.path.join(os.path.dirname(sys.executable), "nanovlm")
    t0 = time.perf_counter()
    r = subprocess.run(
        [exe, "generate", "someone/no-such-model", "--prompt", "Hi"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, HF_HOME=str(tmp_path / "hf")),
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("Error")]
    assert len(lines) == 1 and "pass a local folder" in lines[0], r.stderr
    assert time.perf_counter() - t0 < 20
