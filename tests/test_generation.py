import pytest
import torch

from core.sampling import SamplingConfig
from nanovlm.generation import probabilities, sample
from nanovlm.vision_language_model import VisionLanguageModel
from tests.conftest import tiny_config


def _model(placement: str, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    m = VisionLanguageModel(tiny_config(placement), load_backbone=False).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so greedy paths are not all one token
        for p in m.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    return m


def _prompt(cfg, n_text: int, n_images: int = 1) -> torch.Tensor:
    text = torch.randint(3, cfg.lm_base_vocab_size, (n_text,))
    if cfg.image_placement == "prefix":
        return text
    img = torch.full((cfg.mp_image_token_length * n_images,), cfg.image_token_id)
    return torch.cat([text[:2], img, text[2:]])


@pytest.mark.parametrize("placement", ["replace", "prefix"])
def test_kv_cache_equals_recomputation(placement):
    m = _model(placement)
    ids = _prompt(m.cfg, 7)[None]
    imgs = torch.rand(1, 3, 32, 32)
    cached = m.generate(ids, imgs, max_new_tokens=20)
    uncached = m.generate(ids, imgs, max_new_tokens=20, use_kv_cache=False)
    assert cached.shape == (1, 20)
    assert cached.tolist() == uncached.tolist()
    assert len(set(cached[0].tolist())) > 1  # a non-degenerate continuation


@pytest.mark.parametrize("placement", ["replace", "prefix"])
def test_left_padded_batch_equals_single(placement):
    m = _model(placement, seed=3)
    prompts = [_prompt(m.cfg, n) for n in (3, 9, 6)]
    imgs = torch.rand(3, 3, 32, 32)
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    batch = m.generate(ids, imgs, attention_mask=mask, max_new_tokens=12)
    for i, p in enumerate(prompts):
        single = m.generate(p[None], imgs[i : i + 1], max_new_tokens=12)
        assert batch[i].tolist() == single[0].tolist(), f"row {i}"


def test_rows_stop_at_eos_and_generation_ends_when_all_finish():
    m = _model("replace", seed=5)
    ids = _prompt(m.cfg, 5)[None].repeat(2, 1)
    imgs = torch.rand(1, 3, 32, 32).repeat(2, 1, 1, 1)  # two identical rows finish together
    free = m.generate(ids, imgs, max_new_tokens=10)
    eos = int(free[0, 3])  # make the 4th greedy token the "eos"
    stopped = m.generate(ids, imgs, max_new_tokens=10, eos_token_id=eos)
    first = free[0].tolist().index(eos)
    assert stopped.shape[1] == first + 1  # no wasted steps once every row finished
    assert stopped[0].tolist() == free[0, : first + 1].tolist()


def test_rows_finish_independently():
    """Declare as EOS a token that row 0 produces and row 1 never does: row 0 stops there and is
    padded, row 1 runs to the limit unchanged."""
    m = _model("replace", seed=6)
    torch.manual_seed(0)
    ids = torch.stack([_prompt(m.cfg, 5), _prompt(m.cfg, 5)])
    imgs = torch.rand(2, 3, 32, 32)
    free = m.generate(ids, imgs, max_new_tokens=10)
    row0, row1 = free[0].tolist(), free[1].tolist()
    stops = [(j, t) for j, t in enumerate(row0) if t not in row1 and t not in row0[:j]]
    assert stops, f"the two rows produced the same tokens: {row0} / {row1}"
    j, eos = stops[0]
    out = m.generate(ids, imgs, max_new_tokens=10, eos_token_id=eos)
    assert out.shape[1] == 10
    assert out[0, : j + 1].tolist() == row0[: j + 1]
    assert out[0, j + 1 :].tolist() == [eos] * (9 - j)  # finished row is padded with eos
    assert out[1].tolist() == row1


def test_seeded_sampling_is_reproducible():
    m = _model("replace", seed=7)
    ids, imgs = _prompt(m.cfg, 5)[None], torch.rand(1, 3, 32, 32)
    a = m.generate(ids, imgs, max_new_tokens=15, sampling=SamplingConfig(temperature=1.5, seed=123))
    b = m.generate(ids, imgs, max_new_tokens=15, sampling=SamplingConfig(temperature=1.5, seed=123))
    g = m.generate(ids, imgs, max_new_tokens=15)
    assert a.tolist() == b.tolist()
    assert a.tolist() != g.tolist()


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert (k2[0, 2:] == 0).all() and (k2[0, :2] > 0).all()
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.75))  # 0.5 + 0.3 reaches 0.75: two
    assert (p[0, :2] > 0).all() and (p[0, 2:] == 0).all()
    p1 = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.1))  # the top token always stays
    assert p1[0, 0] == 1 and (p1[0, 1:] == 0).all()
    assert sample(logits, SamplingConfig()).tolist() == [0]


def test_context_overflow_is_a_clear_error():
    m = _model("replace")
    ids, imgs = _prompt(m.cfg, 5)[None], torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        m.generate(ids, imgs, max_new_tokens=510)


def test_image_count_mismatch_is_a_clear_error():
    m = _model("replace")
    ids = _prompt(m.cfg, 5, n_images=1)[None]
    with pytest.raises(ValueError, match="hold 4 image tokens but 2 images give 8"):
        m(ids, torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="image tokens but no images"):
        m(ids, None)


def test_nested_image_lists_equal_tensor():
    m = _model("replace")
    ids = torch.stack([_prompt(m.cfg, 4, 2), _prompt(m.cfg, 4, 2)])
    imgs = torch.rand(4, 3, 32, 32)
    a, _ = m(ids, imgs)
    b, _ = m(ids, [[imgs[0], imgs[1]], [imgs[2:4]]])
    assert torch.equal(a, b)


def test_forward_loss_ignores_minus_100():
    m = _model("replace")
    ids = _prompt(m.cfg, 6)[None]
    targets = torch.full_like(ids, -100)
    targets[0, -3:] = ids[0, -3:]
    logits, loss = m(ids, torch.rand(1, 3, 32, 32), targets=targets)
    expected = torch.nn.functional.cross_entropy(logits[0, -3:], ids[0, -3:])
    assert torch.allclose(loss, expected, atol=1e-6)


def test_nanovlm_keywords_mean_what_they_mean_in_nanovlm():
    """nanoVLM's generate(..., greedy, top_k, top_p, temperature) with its defaults for the rest."""
    m = _model("replace", seed=7)
    ids, imgs = _prompt(m.cfg, 5)[None], torch.rand(1, 3, 32, 32)
    assert (
        m.generate(ids, imgs, max_new_tokens=12, greedy=True).tolist()
        == m.generate(ids, imgs, max_new_tokens=12).tolist()
    )

    def seeded(**kw):
        torch.manual_seed(5)
        return m.generate(ids, imgs, max_new_tokens=12, **kw).tolist()

    # top_k given, the rest nanoVLM's: temperature 0.5, top_p 0.9, sampled
    expected = seeded(sampling=SamplingConfig(temperature=0.5, top_k=3, top_p=0.9))
    assert seeded(top_k=3) == expected
    assert seeded(top_k=3, temperature=2.0) == seeded(
        sampling=SamplingConfig(temperature=2.0, top_k=3, top_p=0.9)
    )
    assert seeded(top_k=3, temperature=2.0) != expected
    with pytest.raises(ValueError, match=r"either sampling= or nanoVLM's keywords \(top_k\)"):
        m.generate(ids, imgs, max_new_tokens=4, sampling=SamplingConfig(), top_k=3)
