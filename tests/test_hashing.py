"""gren.hashing: every CPU path bit-exact with imagehash.phash, on real NIH images and generated images of
odd sizes; the run-time choice of path and its overrides.

Exactness cases never ask the code under test whether to compare: each test image is known to be
non-degenerate from a margin computed here from the reference itself (Pillow's resize, scipy's DCT:
what imagehash runs), and the comparison is then unconditional.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.fftpack
import torch
from PIL import Image

import gren.hashing as hashing
from gren.core.errors import GrenError
from gren.hashing import (
    CPU_PATHS,
    PHASH_PATH_ENV,
    PhashPathError,
    calibrate,
    cpu_path,
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

MIN_REFERENCE_MARGIN = 1e-3
"""A test image counts as non-degenerate when, in the reference computation, its nearest low-block DCT
coefficient is at least this far from the median (DCT units; float64 rounding is ~1e-9 here, and the
generated and real images of these tests have margins of 0.9 to 600)."""


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random smooth uint8 (H, W) image with some noise."""
    coarse = (rng.random((max(2, height // 8 + 2), max(2, width // 8 + 2))) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    noise = rng.integers(-20, 21, smooth.shape)
    return np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8)


def reference_hex(image: Image.Image | np.ndarray) -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return str(imagehash.phash(image))


def reference_margin(image: Image.Image | np.ndarray) -> float:
    """Distance of the nearest low-block coefficient to the median, computed the way imagehash computes
    the block (``convert('L')``, Pillow's resize, ``scipy.fftpack.dct`` twice), independently of gren."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8].reshape(-1)
    return float(np.abs(low - np.median(low)).min())


def usable(path: str) -> bool:
    """Whether ``path`` may run on this CPU (the int8 paths need exact int8 GEMMs; see test_int8_*)."""
    return hashing.path_usable(path)


SIZES = [
    (37, 91), (91, 37), (300, 120), (120, 300), (33, 33), (32, 32), (32, 75), (75, 32), (20, 17),
    (8, 8), (1, 1), (2, 3), (5, 200), (200, 5), (100, 40), (40, 100), (64, 33), (513, 257), (1024, 1024),
]  # fmt: skip
FLAT_BY_CONSTRUCTION = {(1, 1)}  # one pixel upsampled is a flat thumbnail: all 63 AC coefficients tie at 0


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_resize_and_hash_match_pillow_and_imagehash(height, width, path):
    if not usable(path):
        with pytest.raises(PhashPathError, match="not exact"):
            phash(np.zeros((1, height, width), dtype=np.uint8), path=path)
        return
    rng = np.random.default_rng(height * 1000 + width)
    for _ in range(2):
        pixels = smooth_image(rng, height, width)
        expected = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.Resampling.LANCZOS))
        assert np.array_equal(resize32(pixels, path=path)[0].numpy(), expected)
        if (height, width) in FLAT_BY_CONSTRUCTION:
            continue
        assert reference_margin(pixels) > MIN_REFERENCE_MARGIN  # the generator's images are never flat
        assert to_hex(phash(pixels, path=path)[0]) == reference_hex(pixels)


NOISE_SIZES = [(512, 512), (97, 301), (301, 97), (3, 5000), (5000, 3), (40, 2100), (2, 12000)]


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize(("height", "width"), NOISE_SIZES)
def test_resize_of_full_range_noise_matches_pillow(height, width, path):
    """Full-range noise: the worst case for the int8 paths' partial sums (saturation, int32 bounds)."""
    if not usable(path):
        return  # refusal asserted in test_resize_and_hash_match_pillow_and_imagehash
    rng = np.random.default_rng(height + 7 * width)
    pixels = rng.integers(0, 256, size=(2, height, width), dtype=np.uint8)
    pixels[1, :, ::2] = 255  # extremes side by side
    pixels[1, :, 1::2] = 0
    expected = np.stack([np.asarray(Image.fromarray(p).resize((32, 32), Image.Resampling.LANCZOS)) for p in pixels])
    assert np.array_equal(resize32(pixels, path=path).numpy(), expected)


def test_int8_7bit_bands_stay_within_the_int32_bound():
    assert hashing._int8_7bit_bands(12000) == ()  # one window alone is too deep: float64 takes that pass
    for length in (33, 128, 512, 1024, 2100, 5000, 7000):
        bands = hashing._int8_7bit_bands(length)
        assert max(last - first + pad for first, last, _, _, pad, *_ in bands) <= hashing._INT32_SAFE_DEPTH
        assert [band[2] for band in bands] == sorted(band[2] for band in bands)
        assert sum(band[3] - band[2] for band in bands) == 32
        for band in bands:
            assert int(band[5].abs().max()) <= 64 and band[6] in (3, 4)


def test_phash_with_margin_agrees_with_the_reference_margin():
    rng = np.random.default_rng(21)
    images = [smooth_image(rng, 90 + 7 * i, 140 - 5 * i) for i in range(6)]
    _, margin = phash_with_margin(images)
    expected = [reference_margin(image) for image in images]
    assert np.allclose(margin.numpy(), expected, rtol=0, atol=1e-6)
    flat = np.full((1, 40, 40), 77, dtype=np.uint8)
    assert float(phash_with_margin(flat)[1][0]) < hashing.TIE_MARGIN  # a tie really is reported


def test_vertical_first_rule_follows_pillow():
    assert not vertical_first(512, 512)
    assert vertical_first(100, 40)  # H - 32 > 2 (W - 32)
    assert not vertical_first(48, 40)
    assert vertical_first(49, 40)
    assert not vertical_first(20, 10)  # no height reduction


@pytest.mark.parametrize("path", [p for p in CPU_PATHS if usable(p)] + [None])
def test_batch_of_real_nih_images_is_bit_exact(nih_dir, path):
    paths = sorted((nih_dir / "images").iterdir())[::22][:100]
    images = [Image.open(p).convert("L") for p in paths]
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    bits = phash(batch, path=path)
    assert bits.shape == (len(images), 64) and bits.dtype == torch.bool
    # which images to compare is decided by the reference, never by the code under test
    kept = [i for i in range(len(images)) if reference_margin(images[i]) > MIN_REFERENCE_MARGIN]
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
    assert all(reference_margin(crop) > MIN_REFERENCE_MARGIN for crop in crops)
    assert to_hex(phash(crops, path=path)) == [reference_hex(c) for c in crops]


@pytest.mark.parametrize("path", [p for p in CPU_PATHS if usable(p)])
def test_nih_original_pngs_are_bit_exact(nih_dir, path):
    """NIH's own 1024 x 1024 PNGs (some stored as RGBA), given as PIL images."""
    paths = sorted((nih_dir / "originals").glob("*.png"))[:4]
    assert paths, f"no PNG in {nih_dir / 'originals'}"
    images = [Image.open(p) for p in paths]
    for image in images:
        image.load()
    assert all(reference_margin(image) > MIN_REFERENCE_MARGIN for image in images)
    assert to_hex(phash(images, path=path)) == [reference_hex(image) for image in images]


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
    from gren.core.imageio import pil_to_gray

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


def test_float64_path_used_off_cpu_is_exact_too(nih_dir):
    """The non-CPU code path (float64 GEMM resize, matmul DCT), run on the CPU."""
    paths = sorted((nih_dir / "images").iterdir())[:8]
    images = [Image.open(p).convert("L") for p in paths]
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    expected = np.stack([np.asarray(im.resize((32, 32), Image.Resampling.LANCZOS)) for im in images])
    thumbnails = hashing.resize32(batch, path="float64")
    assert np.array_equal(thumbnails.numpy(), expected)
    assert all(reference_margin(image) > MIN_REFERENCE_MARGIN for image in images)
    bits = hashing._bits_from_low(hashing._low_dct_matmul(thumbnails))[0]
    assert to_hex(bits) == [reference_hex(image) for image in images]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(7)
    batch = torch.from_numpy(np.stack([smooth_image(rng, 300, 300) for _ in range(8)]))
    on_gpu = phash(batch.cuda())
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), phash(batch))
    with pytest.raises(PhashPathError, match="CPU path"):
        phash(batch.cuda(), path="pillow")


# --------------------------------------------------------------------------------------------
# The run-time choice of CPU path
# --------------------------------------------------------------------------------------------


def test_calibration_picks_the_fastest_exact_path():
    result = calibrate()
    assert result["choice"] in CPU_PATHS
    assert result["exact"][result["choice"]]
    rates = result["images_per_s"]
    assert rates and all(rate > 0 for rate in rates.values())
    assert result["choice"] == max(rates, key=rates.get)
    assert {"pillow", "float64"} <= set(rates)  # always candidates (and always exact)
    for path in CPU_PATHS:
        assert (path in rates) == hashing.path_usable(path) == result["usable"][path]
    assert calibrate() is result  # measured once per process


def test_path_argument_and_environment_override(monkeypatch):
    resized_by_pillow = []
    real_serial = hashing._pillow_resize_serial

    def spy(images):
        resized_by_pillow.append(len(images))
        return real_serial(images)

    monkeypatch.setattr(hashing, "_pillow_resize_serial", spy)
    rng = np.random.default_rng(17)
    pixels = np.stack([smooth_image(rng, 120, 96) for _ in range(3)])
    expected = [reference_hex(image) for image in pixels]

    monkeypatch.setenv(PHASH_PATH_ENV, "pillow")
    assert cpu_path() == "pillow"
    assert to_hex(phash(pixels)) == expected
    assert sum(resized_by_pillow) == 3

    resized_by_pillow.clear()
    assert cpu_path("float64") == "float64"  # the argument wins over the environment
    assert to_hex(phash(pixels, path="float64")) == expected
    assert resized_by_pillow == []

    monkeypatch.setenv(PHASH_PATH_ENV, " Float64 ")
    assert cpu_path() == "float64"
    monkeypatch.setenv(PHASH_PATH_ENV, "auto")
    assert cpu_path() == calibrate()["choice"]
    monkeypatch.delenv(PHASH_PATH_ENV)
    assert cpu_path() == calibrate()["choice"]

    monkeypatch.setenv(PHASH_PATH_ENV, "fast")
    with pytest.raises(PhashPathError, match=r"\$GREN_PHASH_PATH") as error:
        phash(pixels)
    assert isinstance(error.value, GrenError)
    with pytest.raises(PhashPathError, match="argument"):
        phash(pixels, path="gpu")


def test_calibration_drops_a_path_that_is_not_exact(monkeypatch):
    """A GEMM path whose thumbnails differ from Pillow's is never chosen, however fast."""
    monkeypatch.setattr(hashing, "_CALIBRATION", None)  # restored after the test
    monkeypatch.setattr(hashing, "_int8_gemm_exact", lambda: True)
    real_pass = hashing._int8_pass

    def off_by_one(pixels, out):
        real_pass(pixels, out)
        out[0, 0] ^= 1

    monkeypatch.setattr(hashing, "_int8_pass", off_by_one)
    result = calibrate()
    assert result["exact"]["int8"] is False
    assert "int8" not in result["images_per_s"]
    assert result["choice"] != "int8" and result["choice"] in result["images_per_s"]


def test_int8_paths_refused_where_int8_gemms_are_not_exact(monkeypatch):
    monkeypatch.setattr(hashing, "_CALIBRATION", None)
    monkeypatch.setattr(hashing, "_int8_gemm_exact", lambda: False)
    with pytest.raises(PhashPathError, match="not exact on this CPU"):
        cpu_path("int8")
    assert calibrate()["choice"] != "int8"
    monkeypatch.setattr(hashing, "_int8_7bit_gemm_exact", lambda: False)
    with pytest.raises(PhashPathError, match="not exact on this CPU"):
        cpu_path("int8_7bit")
    assert calibrate(force=True)["choice"] in ("pillow", "float64")


PROBE_SCRIPT = textwrap.dedent(
    """
    import numpy as np, torch
    import gren.hashing as h
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (1024, 512), dtype=np.uint8)
    weights = h.lanczos_coefficients(512)
    expected = np.clip((rows.astype(np.int64) @ weights.T + h._ROUNDING) >> 22, 0, 255)
    out = np.empty((32, len(rows)), dtype=np.uint8)
    h._int8_pass(rows, out)
    out7 = np.empty((32, len(rows)), dtype=np.uint8)
    h._int8_7bit_pass(rows, out7)
    print(int(h._int8_gemm_exact()), int(np.array_equal(out.T, expected)),
          int(h._int8_7bit_gemm_exact()), int(np.array_equal(out7.T, expected)), h.cpu_path())
    """
)


@pytest.mark.parametrize("isa", [None, "AVX2"])
def test_int8_probe_tells_whether_the_int8_pass_is_exact(isa):
    """Each probe must agree with its int8 pass. ``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN use its
    non-VNNI kernels, whose int16 pair sums saturate full-range operands: there the int8 probe must say
    no and the automatic choice must not be int8 (on this Xeon the 7-bit path stays exact)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(PHASH_PATH_ENV, None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    probe, really_exact, probe_7bit, really_exact_7bit, chosen = done.stdout.split()
    assert probe == really_exact
    assert probe_7bit == really_exact_7bit
    if probe == "0":
        assert chosen != "int8"
    if probe_7bit == "0":
        assert chosen != "int8_7bit"


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
