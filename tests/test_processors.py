import numpy as np
import pytest
from PIL import Image

from core.processors import (
    ImageProcessor,
    Tokenizer,
    format_prompt,
    image_string,
    images_per_grid,
    left_pad,
    load_image,
)
from tests.conftest import tiny_config

skimage_data = pytest.importorskip("skimage.data")


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_tiles_of_real_photos(name):
    photo = Image.fromarray(getattr(skimage_data, name)())
    proc = ImageProcessor(tile_size=32, max_size=64)
    pixels, grid = proc(photo)
    h, w = proc.target_size(photo.height, photo.width)
    assert grid == (h // 32, w // 32) and max(h, w) <= 64
    assert pixels.shape == (images_per_grid(grid), 3, 32, 32) and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    # tiles are the resized image cut row-major (the global view, when present, comes first)
    full = np.asarray(photo.resize((w, h), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1) / 255.0
    first_tile = pixels[1] if grid != (1, 1) else pixels[0]
    assert np.array_equal(first_tile, full[:, :32, :32])


def test_target_size_keeps_aspect_and_caps_long_side():
    proc = ImageProcessor(tile_size=512, max_size=1536)
    assert proc.target_size(300, 640) == (512, 1024)  # long side ceils to the grid, short side scales
    assert proc.target_size(480, 640) == (1024, 1024)  # 480 * 1024/640 = 768 ceils to 1024
    assert proc.target_size(3000, 1000) == (1536, 512)
    assert proc.target_size(100, 100) == (512, 512)
    assert ImageProcessor(512, 1536, resize_to_max=True).target_size(100, 100) == (1536, 1536)


def test_prefix_placement_is_one_square_image():
    pixels, grid = ImageProcessor(32, 32, placement="prefix")(Image.new("RGB", (90, 40), (255, 0, 0)))
    assert pixels.shape == (1, 3, 32, 32) and grid == (1, 1)
    assert np.allclose(pixels[0, 0], 1.0) and np.allclose(pixels[0, 1:], 0.0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    if mode == "I;16":
        img = Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))
        assert img.mode.startswith("I;16")
    else:
        img = Image.new("RGB", (30, 20), (200, 200, 200)).convert(mode)
    path = tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg"
    img.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB" and rgb.size == (30, 20)
    if mode == "I;16":
        assert np.asarray(rgb).min() == 255  # full-scale 16-bit is white, not clipped garbage


def test_non_image_and_missing_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: not a readable image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "nope.png")


def _blank_png(path, width: int, height: int) -> None:
    """A valid 1-bit PNG of the given size, written row by row (a few hundred kB on disk however
    large: the decompression-bomb shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data)
            + chunk(b"IEND", b"")
        )


def test_decompression_bomb_guard(tmp_path):
    """Real files: one over our pixel limit, and a 40000x40000 one that Pillow refuses at open;
    both are a one-line ValueError naming the file, and neither is decoded."""
    _blank_png(tmp_path / "big.png", 4000, 3000)
    assert Image.open(tmp_path / "big.png").size == (4000, 3000)  # a valid PNG
    with pytest.raises(ValueError, match="big.png: image is 4000x3000 = 12000000 pixels, above the limit"):
        load_image(tmp_path / "big.png", max_pixels=10_000_000)
    _blank_png(tmp_path / "bomb.png", 40000, 40000)
    assert (tmp_path / "bomb.png").stat().st_size < 2_000_000
    with pytest.raises(ValueError, match="bomb.png: .*40000x40000|bomb.png: .*pixels"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(ValueError, match="above the limit"):
        load_image(Image.new("L", (200, 200)), max_pixels=100 * 100)


def test_image_string_counts_and_markers():
    cfg = tiny_config()
    s = image_string([(1, 1)], cfg)
    assert s == "<|global_image|>" + "<|image|>" * 4
    s = image_string([(2, 3), (1, 1)], cfg)
    assert s.startswith("<image: 0><|global_image|>") and "<row_2_col_3>" in s and "<image: 1>" in s
    assert s.count("<|image|>") == 4 * (images_per_grid((2, 3)) + 1)
    with pytest.raises(ValueError, match="exceeds the 8x8"):
        image_string([(9, 1)], cfg)


def test_tokenizer_extra_token_ids_and_prompt(tiny_tokenizer_dir):
    cfg = tiny_config()
    tok = Tokenizer.from_dir(tiny_tokenizer_dir, cfg)
    assert tok.eos_token_id == tok.tok.token_to_id("<|im_end|>")
    prompt = format_prompt(cfg, "How many circles?", [(1, 1)])
    assert prompt.startswith("<|im_start|>user\n<|global_image|><|image|>")
    assert prompt.endswith("How many circles?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids.count(cfg.image_token_id) == 4
    assert tok.decode(tok.encode("There are 3."), skip_special_tokens=True) == "There are 3."
    with pytest.raises(ValueError, match="empty prompt"):
        format_prompt(cfg, "  ", [(1, 1)])


def test_tokenizer_with_conflicting_ids_is_rejected(tiny_tokenizer_dir):
    cfg = tiny_config(lm_base_vocab_size=290, lm_vocab_size=400)
    with pytest.raises(ValueError, match="maps extra token image_token"):
        Tokenizer.from_dir(tiny_tokenizer_dir, cfg)


def test_multi_turn_puts_images_in_first_turn():
    cfg = tiny_config()
    p = format_prompt(cfg, "and now?", [(1, 1)], history=[("first?", "yes")])
    assert p.count("<|global_image|>") == 1 and p.index("<|global_image|>") < p.index("first?")
    assert "<|im_start|>assistant\nyes<|im_end|>" in p


def test_prefix_prompt_format():
    cfg = tiny_config("prefix")
    assert format_prompt(cfg, "What is it?", [(1, 1)]) == "Question: What is it? Answer:"


def test_left_pad():
    ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
