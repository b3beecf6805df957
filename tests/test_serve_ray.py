"""Scale-out on Ray Serve: a local Ray cluster on this machine, 2 replicas of the server, one replica's
process killed mid-load; every request must still be answered, exactly, and Ray must replace it."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from runtime.pipeline import VLMPipeline
from serve.process import ServerProcess
from tests.conftest import export_lively
from tests.serve_helpers import user

pytest.importorskip("ray")
openai = pytest.importorskip("openai")
skimage_data = pytest.importorskip("skimage.data")


KEY = "sk-ray-0123456789"


def replica_pids() -> list[int]:
    """PIDs of the Ray Serve replica processes of our deployment (their process title names it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ServeReplica:nanovlm:nanovlm" in cmd:
                pids.append(int(entry))
    return sorted(pids)


def _ray_stop() -> None:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


@pytest.mark.slow
def test_two_replicas_survive_a_killed_replica(tiny_tokenizer_dir, tmp_path):
    bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path, "fused")[1]
    pipe = VLMPipeline.from_bundle(bundle)
    photo = Image.fromarray(skimage_data.coffee()).resize((60, 40))
    questions = ["What is it?", "Describe the colours.", "Cat?", "How many red circles are there?"]
    cases = [(q, [photo] if i % 2 else [], 8 + 4 * (i % 5)) for i, q in enumerate(questions * 10)]
    expected = [pipe.generate(imgs, q, max_new_tokens=n) for q, imgs, n in cases]
    assert len(set(expected)) > 3

    env_before = replica_pids()
    assert not env_before, f"replica processes already running: {env_before}"
    try:
        with ServerProcess(
            bundle, "--ray", "--replicas", "2", "--cpus-per-replica", "1", "--api-key", KEY, timeout=300
        ) as server:
            deadline = time.monotonic() + 120
            while len(replica_pids()) < 2 and time.monotonic() < deadline:
                time.sleep(0.5)
            first = replica_pids()
            assert len(first) == 2, first
            # the replicas check keys as `serve` does
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=8, timeout=120)

            def ask(i):
                q, imgs, n = cases[i]
                if i == len(cases) // 3:  # a third of the way in: kill one replica's process
                    os.kill(first[0], signal.SIGKILL)
                return c.chat.completions.create(model="x", messages=[user(q, *imgs)], max_tokens=n)

            with ThreadPoolExecutor(6) as pool:
                replies = list(pool.map(ask, range(len(cases))))
            assert [r.choices[0].message.content for r in replies] == expected

            deadline = time.monotonic() + 180  # Ray starts a new replica in place of the dead one
            while (len(replica_pids()) < 2 or first[0] in replica_pids()) and time.monotonic() < deadline:
                time.sleep(0.5)
            now = replica_pids()
            assert len(now) == 2 and first[0] not in now and first[1] in now, (first, now)
            r = c.chat.completions.create(model="x", messages=[user("Cat?")], max_tokens=5)
            assert r.choices[0].message.content == pipe.generate([], "Cat?", max_new_tokens=5)
    finally:
        _ray_stop()
