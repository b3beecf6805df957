"""The load and fault test (benchmarks/serve_load.py) in the slow tier, on a tiny exported model."""

import pytest

from serve.process import ServerProcess
from tests.conftest import export_lively

pytest.importorskip("skimage.data")


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["standard", "fused"])
def test_300_requests_at_concurrency_16_with_faults(decoder, tiny_tokenizer_dir, tmp_path):
    from benchmarks.serve_load import expected_answers, run_load, valid_cases

    bundle = export_lively("replace", tiny_tokenizer_dir, tmp_path, decoder)[1]
    cases = valid_cases()
    expected_answers(bundle, cases)
    assert len({c.expected for c in cases}) > 5, "the answers hardly differ: the comparison would be weak"
    # Limits below what the cases fill (this model: ~430 kB of prompt KV, ~40 kB of image
    # embeddings), so both caches evict all along and every answer is checked under eviction.
    mb = {"prefix": 0.2, "image": 0.02}
    limits = {name: m * 2**20 for name, m in mb.items()}
    flags = [f for name, m in mb.items() for f in (f"--{name}-cache-mb", str(m))]
    with ServerProcess(bundle, "--max-batch", "8", "--max-queue", "256", *flags) as server:
        rounds = [run_load(server, cases, 300, 16, 0.10, 0.05, seed) for seed in (0, 1, 2)]
    for r in rounds:
        assert r["valid_correct"] == r["valid"] > 200
        assert r["malformed_4xx"] == r["kinds"]["malformed"] > 0 and r["kinds"]["disconnect"] > 0
        assert r["server_errors_5xx"] == 0
        for name, limit in limits.items():  # sampled every 0.2 s: within the limit, and filled to it
            assert limit / 2 <= r["cache_peak_bytes"][name] <= limit, (name, r["cache_peak_bytes"])
    # Resident memory flat: after 600 more requests the server rests within 5% of the first
    # round's high-water mark. The resting size itself is noise (12 rounds of this load rested
    # between 108 and 114 MB in no trend, with and without eviction), so comparing two resting
    # sizes flaked; a leak of 30 kB per request (18 MB over rounds 2 and 3) still fails this.
    high, last = rounds[0]["rss_mb"]["peak"], rounds[-1]["rss_mb"]["end"]
    assert last <= high * 1.05, [r["rss_mb"] for r in rounds]
