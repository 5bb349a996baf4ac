"""gren.hashing: bit-exact with imagehash.phash, on real NIH images and generated images of odd sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gren.hashing import (
    from_hex,
    hamming,
    hamming_pairs,
    phash,
    phash_with_margin,
    resize32,
    to_hex,
    vertical_first,
)

imagehash = pytest.importorskip("imagehash")


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random smooth uint8 (H, W) image with some noise: never flat, so no median ties."""
    coarse = (rng.random((max(2, height // 8 + 2), max(2, width // 8 + 2))) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    noise = rng.integers(-20, 21, smooth.shape)
    return np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)


def reference_hex(image: Image.Image | np.ndarray) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return str(imagehash.phash(image))


SIZES = [
    (37, 91), (91, 37), (300, 120), (120, 300), (33, 33), (32, 32), (32, 75), (75, 32), (20, 17),
    (8, 8), (1, 1), (2, 3), (5, 200), (200, 5), (100, 40), (40, 100), (64, 33), (513, 257), (1024, 1024),
]  # fmt: skip


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_resize_and_hash_match_pillow_and_imagehash(height, width):
    rng = np.random.default_rng(height * 1000 + width)
    for _ in range(2):
        pixels = smooth_image(rng, height, width)
        expected = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.LANCZOS))
        assert np.array_equal(resize32(pixels)[0].numpy(), expected)
        bits, margin = phash_with_margin(pixels)
        if float(margin[0]) > 1e-6:  # tiny images can be degenerate
            assert to_hex(bits[0]) == reference_hex(pixels)


def test_vertical_first_rule_follows_pillow():
    assert not vertical_first(512, 512)
    assert vertical_first(100, 40)  # H - 32 > 2 (W - 32)
    assert not vertical_first(48, 40)
    assert vertical_first(49, 40)
    assert not vertical_first(20, 10)  # no height reduction


def test_batch_of_real_nih_images_is_bit_exact(nih_dir):
    paths = sorted((nih_dir / "images").iterdir())[::22][:100]
    images = [Image.open(p).convert("L") for p in paths]
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    bits, margin = phash_with_margin(batch)
    assert bits.shape == (len(images), 64) and bits.dtype == torch.bool
    kept = [i for i in range(len(images)) if float(margin[i]) > 1e-6]
    assert len(kept) >= 99 * len(images) // 100
    ours = to_hex(bits)
    assert [ours[i] for i in kept] == [reference_hex(images[i]) for i in kept]
    # crops of real images, odd and non-square: how lung regions are hashed
    rng = np.random.default_rng(0)
    crops = []
    for index in range(20):
        y0, x0 = rng.integers(0, 150, 2)
        y1, x1 = rng.integers(250, 512, 2)
        crops.append(batch[index, y0:y1, x0:x1].numpy())
    assert to_hex(phash(crops)) == [reference_hex(c) for c in crops]


def test_pil_list_input_any_mode():
    rng = np.random.default_rng(3)
    gray = smooth_image(rng, 90, 70)
    rgb = np.stack([gray, smooth_image(rng, 90, 70), smooth_image(rng, 90, 70)], axis=-1)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (90, 70, 1), dtype=np.uint8)], axis=-1)
    images = [Image.fromarray(gray), Image.fromarray(rgb), Image.fromarray(rgba)]
    expected = [reference_hex(im) for im in images]
    assert to_hex(phash(images)) == expected
    # RGBA: alpha ignored, same as the RGB image
    assert expected[1] == expected[2]
    # 16-bit: mapped to 8 bits by depth (12-bit data / 4095 * 255), then hashed like that 8-bit image
    twelve_bit = (gray.astype(np.int64) * 4095 // 255).astype(np.uint16)
    sixteen = Image.fromarray(twelve_bit)
    assert sixteen.mode == "I;16"
    from gren.data.io import pil_to_gray

    as_eight = pil_to_gray(sixteen)
    assert to_hex(phash([sixteen])[0]) == reference_hex(as_eight)
    assert int(hamming(phash([sixteen]), phash(gray))[0, 0]) <= 2


def test_tensor_input_shapes_and_device():
    rng = np.random.default_rng(5)
    batch = np.stack([smooth_image(rng, 64, 48) for _ in range(3)])
    from_array = phash(batch)
    from_tensor = phash(torch.from_numpy(batch))
    assert torch.equal(from_array, from_tensor)
    assert torch.equal(phash(batch[1]), from_array[1:2])
    assert phash(np.zeros((0, 40, 40), dtype=np.uint8)).shape == (0, 64)
    with pytest.raises(ValueError, match="uint8"):
        phash(torch.zeros(2, 40, 40, dtype=torch.float32))
    with pytest.raises(TypeError, match="PIL image"):
        phash(["not an image"])


def test_float64_path_used_off_cpu_is_exact_too(monkeypatch, nih_dir):
    """The non-CPU code path (float64 GEMM resize, matmul DCT), run on the CPU."""
    import gren.hashing as hashing

    paths = sorted((nih_dir / "images").iterdir())[:8]
    batch = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("L")) for p in paths]))
    rng = np.random.default_rng(11)
    odd = torch.from_numpy(smooth_image(rng, 130, 47)).unsqueeze(0)
    expected_resize = (hashing.resize32(batch), hashing.resize32(odd))
    expected_bits = hashing.phash(batch)
    monkeypatch.setattr(hashing, "_int8_gemm_available", lambda: False)
    assert torch.equal(hashing.resize32(batch), expected_resize[0])
    assert torch.equal(hashing.resize32(odd), expected_resize[1])
    low = hashing._low_dct_matmul(expected_resize[0])
    assert torch.equal(hashing._bits_from_low(low)[0], expected_bits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(7)
    batch = torch.from_numpy(np.stack([smooth_image(rng, 300, 300) for _ in range(8)]))
    on_gpu = phash(batch.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), phash(batch))


def test_hex_round_trip_and_known_hamming():
    codes = ["0000000000000000", "ffffffffffffffff", "8000000000000001", "f0f0f0f0f0f0f0f0"]
    bits = from_hex(codes)
    assert bits.shape == (4, 64)
    assert to_hex(bits) == codes
    assert to_hex(from_hex(codes[2])) == codes[2]
    assert bool(bits[2, 0]) and bool(bits[2, 63]) and not bool(bits[2, 1])  # first bit = most significant
    distances = hamming(bits, bits)
    expected = torch.tensor([[0, 64, 2, 32], [64, 0, 62, 32], [2, 62, 0, 32], [32, 32, 32, 0]])
    assert torch.equal(distances, expected)
    assert torch.equal(hamming_pairs(bits, bits.flip(0)), torch.tensor([32, 62, 62, 32]))
    # agrees with imagehash's own subtraction
    a, b = imagehash.hex_to_hash(codes[2]), imagehash.hex_to_hash(codes[3])
    assert int(hamming(from_hex(codes[2]), from_hex(codes[3]))[0, 0]) == a - b
    with pytest.raises(ValueError, match="hex"):
        from_hex("xyz")


def _hash_in_child(pixels, queue):
    queue.put(phash(pixels).numpy())


def test_hashing_works_in_a_forked_process():
    """The CPU worker pool is per process: a fork after use (DataLoader workers) must not hang."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    rng = np.random.default_rng(9)
    pixels = np.stack([smooth_image(rng, 100, 80) for _ in range(4)])
    in_parent = phash(pixels).numpy()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_hash_in_child, args=(pixels, queue))
    child.start()
    try:
        in_child = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
    assert np.array_equal(in_child, in_parent)
