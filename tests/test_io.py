"""Image decoding: 8/16-bit PNG, RGB/RGBA/LA, palette, bilevel, JPEG; corrupt, truncated, missing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gren.core.errors import ImageReadError
from gren.core.imageio import (
    image_size,
    is_image_file,
    read_gray,
    read_gray_resized,
    read_mask,
    sixteen_bit_to_uint8,
)


def _gradient(height=40, width=60) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) % 256).astype(np.uint8)


def test_8bit_png_roundtrip_exact(tmp_path):
    gray = _gradient()
    Image.fromarray(gray, "L").save(tmp_path / "a.png")
    out = read_gray(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (40, 60)
    np.testing.assert_array_equal(out, gray)
    assert image_size(tmp_path / "a.png") == (60, 40)


@pytest.mark.parametrize(
    "peak, divisor",
    [(4095, 4095), (1023, 1023), (65535, 65535), (40000, 65535), (3000, 4095), (200, 255)],
)
def test_16bit_png_scaled_by_bit_depth(tmp_path, peak, divisor):
    values = np.linspace(0, peak, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode.startswith("I")
    out = read_gray(tmp_path / "b.png")
    assert out.dtype == np.uint8
    expected = np.rint(values.astype(np.float64) * 255.0 / divisor).astype(np.uint8)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert out.max() == expected.max()


def test_16bit_holding_8bit_values_unchanged():
    values = np.array([[0, 17, 255]], dtype=np.uint16)
    np.testing.assert_array_equal(sixteen_bit_to_uint8(values), values.astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_colour_images_become_pil_luma(tmp_path, mode):
    rng = np.random.default_rng(1)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2}[mode]
    pixels = rng.integers(0, 256, (24, 30, channels), dtype=np.uint8)
    image = Image.fromarray(pixels, mode)
    image.save(tmp_path / "c.png")
    out = read_gray(tmp_path / "c.png")
    np.testing.assert_array_equal(out, np.asarray(image.convert("L")))
    if mode == "RGBA":  # alpha ignored: the same colours fully transparent give the same gray
        pixels[..., 3] = 0
        Image.fromarray(pixels, mode).save(tmp_path / "d.png")
        np.testing.assert_array_equal(read_gray(tmp_path / "d.png"), out)


def test_palette_and_bilevel(tmp_path):
    gray = _gradient()
    palette = Image.fromarray(gray, "L").convert("RGB").quantize(colors=16)
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_gray(tmp_path / "p.png"), np.asarray(palette.convert("L")))
    bits = Image.fromarray(gray > 128).convert("1")
    bits.save(tmp_path / "bits.png")
    assert set(np.unique(read_gray(tmp_path / "bits.png"))) <= {0, 255}


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg(tmp_path, mode):
    gray = _gradient(50, 70)
    image = Image.fromarray(gray, "L")
    if mode == "RGB":
        image = image.convert("RGB")
    image.save(tmp_path / "j.JPEG", quality=95)
    out = read_gray(tmp_path / "j.JPEG")
    assert out.shape == (50, 70)
    assert np.abs(out.astype(int) - gray.astype(int)).mean() < 8
    assert image_size(tmp_path / "j.JPEG") == (70, 50)


def test_corrupt_file_names_the_file(tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"definitely not a png" * 10)
    with pytest.raises(ImageReadError, match="corrupt.png"):
        read_gray(bad)
    with pytest.raises(ImageReadError, match="corrupt.png"):
        image_size(bad)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_an_error_on_decode(tmp_path, suffix):
    rng = np.random.default_rng(2)
    path = tmp_path / f"full{suffix}"
    Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8), "L").save(path)
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    assert image_size(cut) == (128, 128)  # the header is intact
    with pytest.raises(ImageReadError, match=f"cut{suffix}"):
        read_gray(cut)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="nope.png"):
        read_gray(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="nope.png"):
        image_size(tmp_path / "nope.png")


def test_resize_and_mask(tmp_path):
    Image.fromarray(_gradient(40, 60), "L").save(tmp_path / "a.png")
    assert read_gray_resized(tmp_path / "a.png", 32).shape == (32, 32)
    assert read_gray_resized(tmp_path / "a.png", (20, 10)).shape == (10, 20)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 1
    mask[:, 32:] = 2
    mask[:8] = 0
    Image.fromarray(mask, "L").save(tmp_path / "m.png")
    small = read_mask(tmp_path / "m.png", 16)
    assert small.shape == (16, 16) and set(np.unique(small)) == {0, 1, 2}
    assert (small[4:, :8] == 1).all() and (small[4:, 8:] == 2).all()


def test_is_image_file():
    assert is_image_file("a/b/00000001_000.PNG") and is_image_file("x.jpeg") and is_image_file("x.Jpg")
    assert not is_image_file("x.csv") and not is_image_file("png")
