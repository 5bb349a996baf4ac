"""Batched perceptual hash (pHash), bit-exact with ``imagehash.phash(image, 8, 4)``, and Hamming distances.

What ``imagehash.phash`` computes (imagehash 4.3.2 on Pillow 13), and how this module reproduces it:

1. ``image.convert('L')``: done by :func:`gren.core.imageio.pil_to_gray` for PIL input (same luma formula;
   16-bit images are mapped to 8 bits by their bit depth, where imagehash would clip them at 255).
   Tensor / array input must already be uint8 grayscale.
2. ``resize((32, 32), LANCZOS)``: Pillow's separable fixed-point resampling. Per input length the
   per-output Lanczos-3 weights are computed exactly as Pillow's ``precompute_coeffs`` does (same
   double-precision arithmetic, normalised to sum 1), then quantised to integers with 22 fractional
   bits (``normalize_coeffs_8bpc``). Each pass adds ``1 << 21``, shifts right by 22 and clips to 0..255,
   so the intermediate image is uint8. Pass order is horizontal first, except that Pillow 13 runs the
   vertical pass first when the height shrinks much more than the width (``H - 32 > 2 (W - 32)`` with
   ``H > 32``, measured on Pillow 13.0; older Pillow is detected and always goes horizontal first).
   A side already 32 pixels long is not resampled (Pillow skips that pass).
   The resize has four exact CPU paths (:data:`CPU_PATHS`); other devices (CUDA) take ``float64``:

   * ``"int8"``: int8 GEMMs (``torch._int_mm``), the coefficients split into three signed base-256
     digits, pixels shifted to -128..127, int32 partial sums recombined without overflow. Exact only
     where the CPU multiplies int8 exactly (VNNI: AVX512_VNNI / AVX_VNNI / AMX); without VNNI oneDNN's
     kernels saturate int16 pair sums and the hashes are wrong, so a probe (:func:`_int8_gemm_exact`)
     refuses the path there.
   * ``"int8_7bit"``: the same GEMMs with 3-4 signed base-128 digits in -64..63 as second operand,
     which the non-VNNI kernels do not saturate (:func:`_int8_7bit_gemm_exact`); with VNNI about as
     fast as ``"int8"`` per CPU-second, without it ~3x faster than Pillow (measured with oneDNN held to AVX2).
   * ``"pillow"``: Pillow's own ``Image.resize((32, 32), LANCZOS)`` per image on worker threads: the
     definition, hence exact on any CPU and Pillow version.
   * ``"float64"``: the coefficients as a float64 matrix, whose 53-bit mantissa holds the sums exactly.

   Which CPU path runs is decided at run time, per process: the ``path`` argument of :func:`phash`,
   else ``$GREN_PHASH_PATH``, else ``auto``: :func:`calibrate` times every usable path once on 16 noise
   images of 512 x 512 (~0.5 s), checks its thumbnails against Pillow's, and keeps the fastest.
3. ``scipy.fftpack.dct(dct(pixels, axis=0), axis=1)``: unnormalised DCT-II. On CPU (every path) the
   same scipy routine is called on the whole batch; on other devices ``C @ X @ C.T`` in float64 with
   ``C[k, n] = 2 cos(pi k (2n + 1) / 64)``.
4. ``low = dct[:8, :8]``; ``bits = low > median(low)`` (median of 64 values = mean of the 32nd and 33rd),
   row-major over the 8 x 8 block. ``str(hash)`` is the 64 bits as 16 hex digits, first bit most
   significant (:func:`to_hex`).

Flat or striped images have low blocks whose values tie at the median; imagehash's bits are then
floating-point noise and no implementation can match them. :func:`phash_with_margin` returns the
distance of the nearest coefficient to the median so callers can tell such images apart.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gren.core.errors import GrenError

logger = logging.getLogger(__name__)

HASH_SIDE = 8
"""Side of the low-frequency DCT block: 64 hash bits."""
RESIZE_SIDE = 32
"""Side of the image the DCT is taken on (hash_size 8 x highfreq_factor 4)."""
HASH_BITS = HASH_SIDE * HASH_SIDE

_PRECISION_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images (32 - 8 - 2)
_ROUNDING = 1 << (_PRECISION_BITS - 1)
_LANCZOS_SUPPORT = 3.0
_ROWS_PER_GEMM = 2048  # rows per CPU GEMM: temporaries stay in cache
_ROWS_PER_TASK = 16384  # image rows per CPU worker task
_ROWS_PER_FLOAT64_GEMM = 1 << 16  # rows per float64 GEMM (CUDA path): bounds the float64 temporaries

TIE_MARGIN = 1e-6
"""Images whose nearest low-block coefficient lies closer than this to the median are ties."""


# --------------------------------------------------------------------------------------------
# Pillow's Lanczos coefficients
# --------------------------------------------------------------------------------------------


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


@functools.lru_cache(maxsize=8192)
def lanczos_coefficients(in_size: int, out_size: int = RESIZE_SIDE) -> np.ndarray:
    """Pillow's fixed-point LANCZOS weights for resampling one axis of ``in_size`` pixels to ``out_size``.

    Returns int64 (out_size, in_size): output pixel ``o`` is
    ``clip((sum_i w[o, i] * pixel[i] + 2**21) >> 22, 0, 255)``. Each row is zero outside Pillow's window
    for that output. Computed with Python floats (C doubles, libm ``sin``) in Pillow's order of operations
    so the quantised integers are identical; cached per size.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resample sizes must be positive, got in_size={in_size}, out_size={out_size}")
    scale = float(in_size) / out_size
    filter_scale = max(scale, 1.0)
    support = _LANCZOS_SUPPORT * filter_scale
    inverse_scale = 1.0 / filter_scale
    weights = np.zeros((out_size, in_size), dtype=np.int64)
    one = float(1 << _PRECISION_BITS)
    for out_index in range(out_size):
        center = (out_index + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - first
        taps = [_lanczos((tap + first - center + 0.5) * inverse_scale) for tap in range(count)]
        total = 0.0
        for tap_weight in taps:
            total += tap_weight
        for tap, tap_weight in enumerate(taps):
            if total != 0.0:
                tap_weight = tap_weight / total
            fixed = int(-0.5 + tap_weight * one) if tap_weight < 0 else int(0.5 + tap_weight * one)
            weights[out_index, first + tap] = fixed
    return weights


@functools.lru_cache(maxsize=1)
def _pillow_may_go_vertical_first() -> bool:
    """Whether the installed Pillow uses the vertical-first rule (Pillow >= 13); probed once on a tall image."""
    from PIL import Image

    rng = np.random.default_rng(12345)
    tall = rng.integers(0, 256, size=(100, 40), dtype=np.uint8)
    thumbnail = Image.fromarray(tall, mode="L").resize((RESIZE_SIDE, RESIZE_SIDE), Image.Resampling.LANCZOS)
    reference = np.asarray(thumbnail)
    horizontal_first = _resize_numpy_reference(tall, vertical_first=False)
    return not np.array_equal(horizontal_first, reference)


def vertical_first(height: int, width: int, out_size: int = RESIZE_SIDE) -> bool:
    """True when Pillow resamples a ``height`` x ``width`` image vertically first (see the module docstring)."""
    if height <= out_size or width == out_size:
        return False
    if (height - out_size) <= 2 * (width - out_size):
        return False
    return _pillow_may_go_vertical_first()


def _resize_numpy_reference(image: np.ndarray, vertical_first: bool) -> np.ndarray:
    """Plain int64 numpy version of the two passes (used to probe Pillow; slow, exact)."""

    def one_pass(rows: np.ndarray) -> np.ndarray:
        if rows.shape[1] == RESIZE_SIDE:
            return rows
        sums = rows.astype(np.int64) @ lanczos_coefficients(rows.shape[1]).T + _ROUNDING
        return np.clip(sums >> _PRECISION_BITS, 0, 255).astype(np.uint8)

    if vertical_first:
        return one_pass(one_pass(image.T).T)
    return one_pass(one_pass(image).T).T


# --------------------------------------------------------------------------------------------
# One resampling pass on a batch of rows
# --------------------------------------------------------------------------------------------


def _int_mm_exact(rows: int, depth: int, cols: int, second_low: int, second_high: int) -> bool:
    """Whether ``torch._int_mm`` of a full-range int8 (rows, depth) by an int8 (depth, cols) whose values lie
    in ``second_low .. second_high`` equals the int64 product: random values plus blocks of the extremes."""
    if not hasattr(torch, "_int_mm"):
        return False
    rng = np.random.default_rng(20240601)
    first = rng.integers(-128, 128, size=(rows, depth), dtype=np.int8)
    second = rng.integers(second_low, second_high + 1, size=(depth, cols), dtype=np.int8)
    first[:, :64], first[: rows // 2, 64:128] = 127, -128
    second[:64, : cols // 2], second[:64, cols // 2 :], second[64:128] = second_high, second_low, second_high
    expected = first.astype(np.int64) @ second.astype(np.int64)
    try:
        product = torch._int_mm(torch.from_numpy(first), torch.from_numpy(second)).numpy()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - depends on the torch build
        return False
    return bool(np.array_equal(product.astype(np.int64), expected))


@functools.lru_cache(maxsize=1)
def _int8_gemm_exact() -> bool:
    """Whether the ``"int8"`` path's GEMMs (two full-range int8 operands) are exact on this CPU.

    Without VNNI (AVX2-only or AVX-512F-only CPUs), oneDNN's s8 x s8 GEMM multiplies with
    ``vpmaddubsw``, whose int16 pair sums saturate: measured here with ``ONEDNN_MAX_CPU_ISA=AVX2``, 44% of
    the first-pass outputs of random 512-pixel rows were wrong and 82 of 100 NIH hashes differed. The
    probe multiplies operands of the shapes the first pass uses and compares with an int64 product.
    """
    exact = _int_mm_exact(24, 208, 256, -128, 127)
    if not exact:
        logger.info("torch._int_mm saturates full-range int8 operands on this CPU (no VNNI?): no 'int8' path")
    return exact


@functools.lru_cache(maxsize=1)
def _int8_7bit_gemm_exact() -> bool:
    """Whether the ``"int8_7bit"`` path's GEMMs (full-range pixels by weight digits in -64..63) are exact.

    oneDNN's non-VNNI kernels add 128 to the first operand (u8) and pair-sum ``u8 x s8`` products in
    int16: with the second operand within -64..63 the pair sums stay below 2 * 255 * 64 = 32640 < 2**15,
    so nothing saturates (measured exact with ``ONEDNN_MAX_CPU_ISA=AVX2`` and natively with VNNI).
    """
    exact = _int_mm_exact(256, 208, 24, -64, 63)
    if not exact:
        logger.info("torch._int_mm is not exact even with 7-bit weights on this CPU: no 'int8_7bit' path")
    return exact


def _signed_digits(weights: np.ndarray) -> np.ndarray:
    """int64 (n, w) weights -> int8 (3 n, w): rows [digit0 (n) | digit1 (n) | digit2 (n)], base 256, signed."""
    digits = []
    rest = weights.copy()
    for _ in range(3):
        digit = ((rest + 128) % 256) - 128
        digits.append(digit)
        rest = (rest - digit) // 256
    if np.any(rest != 0):  # pragma: no cover - |w| <= 2**22 always fits three digits
        raise AssertionError("Lanczos coefficient does not fit three base-256 digits")
    return np.ascontiguousarray(np.concatenate(digits, axis=0).astype(np.int8))


_MIN_GEMM_DEPTH = 8  # oneDNN misreads the strides of an operand with a single column; keep K >= 8


@functools.lru_cache(maxsize=4096)
def _int8_bands(in_size: int) -> tuple[tuple[int, int, int, int, int, torch.Tensor, np.ndarray], ...]:
    """The int8 GEMM operands of one pass, split into bands of outputs.

    Each output reads only a window of ~6 x scale input pixels, so the 32 outputs are split into groups
    (4 groups of 8 for inputs of 128 pixels or more) and each group multiplies only the input columns
    its windows cover. Per band: (first input column, last + 1, first output, last + 1, zero columns to
    pad the input with, int8 digits (3 n, w), int32 (n,) bias
    ``128 sum_i w_i + 2**21``).
    """
    weights = lanczos_coefficients(in_size)  # (32, in_size)
    groups = 4 if in_size >= 4 * RESIZE_SIDE else 1
    per_group = RESIZE_SIDE // groups
    bands = []
    for group in range(groups):
        rows = weights[group * per_group : (group + 1) * per_group]
        used = np.flatnonzero(rows.any(axis=0))
        first, last = int(used[0]), int(used[-1]) + 1
        if last - first < _MIN_GEMM_DEPTH:
            first = max(0, min(first, in_size - _MIN_GEMM_DEPTH))
            last = min(in_size, first + _MIN_GEMM_DEPTH)
        pad = max(0, _MIN_GEMM_DEPTH - (last - first))
        digits = _signed_digits(np.pad(rows[:, first:last], ((0, 0), (0, pad))))
        bias = (128 * rows.sum(axis=1) + _ROUNDING).astype(np.int32)
        bands.append(
            (first, last, group * per_group, (group + 1) * per_group, pad, torch.from_numpy(digits), bias)
        )
    return tuple(bands)


@functools.lru_cache(maxsize=256)
def _float64_coefficients(in_size: int, device: torch.device) -> torch.Tensor:
    """float64 (in_size, 32) fixed-point coefficients (integers) on ``device``."""
    return torch.from_numpy(lanczos_coefficients(in_size).T.copy()).to(device=device, dtype=torch.float64)


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)  # OpenMP thread counts are per thread: the caller's setting is unchanged


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    global _POOLS_LOCK, _CALIBRATION_LOCK
    _POOLS_LOCK = threading.Lock()  # a lock held by another thread at fork time would never be released
    _CALIBRATION_LOCK = threading.Lock()  # (a calibration finished before the fork stays valid: same CPU)
    _POOLS.clear()  # the parent's worker threads do not exist in the child


os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool_of(workers: int) -> ThreadPoolExecutor:
    # keyed by process id too, in case a process was started without the fork hook (belt and braces)
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(
                workers, thread_name_prefix="gren-phash", initializer=_single_threaded_worker
            )
        return _POOLS[key]


def _cpu_pool() -> ThreadPoolExecutor:
    """Workers for the CPU passes: as many as torch's intra-op threads, each running single-threaded.

    Sub-batches are independent, so parallelism across them needs no synchronisation inside an op;
    this keeps many small ops (lung crops of many sizes) cheap and degrades gracefully when the cores
    are shared with other processes (OpenMP barriers after every small op do not).
    """
    return _pool_of(max(1, torch.get_num_threads()))


def _resample_rows(rows: torch.Tensor, kernel: str) -> torch.Tensor:
    """One Pillow LANCZOS pass along the last axis: uint8 (R, L) -> uint8 (R, 32), bit-exact.

    ``kernel``: ``"int8"`` (CPU int8 GEMMs, only where :func:`_int8_gemm_exact`), ``"int8_7bit"`` (CPU,
    where :func:`_int8_7bit_gemm_exact`) or ``"float64"`` (any device).
    """
    length = rows.shape[1]
    if length == RESIZE_SIDE:
        return rows
    if kernel == "int8_7bit" and not _int8_7bit_bands(length):
        kernel = "float64"  # a window wider than the int32 bound: exact in float64
    if kernel == "int8_7bit":
        pixels = rows.contiguous().numpy()
        out = np.empty((RESIZE_SIDE, rows.shape[0]), dtype=np.uint8)  # outputs-major
        for start in range(0, rows.shape[0], _ROWS_PER_GEMM):
            stop = start + _ROWS_PER_GEMM
            _int8_7bit_pass(pixels[start:stop], out[:, start:stop])
        return torch.from_numpy(out).t()  # (R, 32) view
    if kernel == "int8":
        pixels = rows.contiguous().numpy()
        out = np.empty((RESIZE_SIDE, rows.shape[0]), dtype=np.uint8)  # outputs-major
        for start in range(0, rows.shape[0], _ROWS_PER_GEMM):
            stop = start + _ROWS_PER_GEMM
            _int8_pass(pixels[start:stop], out[:, start:stop])
        return torch.from_numpy(out).t()  # (R, 32) view
    out = torch.empty((rows.shape[0], RESIZE_SIDE), dtype=torch.uint8, device=rows.device)
    weights = _float64_coefficients(length, rows.device)
    for start in range(0, rows.shape[0], _ROWS_PER_FLOAT64_GEMM):
        chunk = rows[start : start + _ROWS_PER_FLOAT64_GEMM]
        sums = chunk.to(torch.float64) @ weights + _ROUNDING
        values = torch.floor(sums / float(1 << _PRECISION_BITS))
        out[start : start + chunk.shape[0]] = values.clamp_(0, 255)
    return out


_SIGN_FLIP_8X = np.uint64(0x8080808080808080)  # flips the top bit of 8 packed bytes: p -> p - 128 as int8


def _int8_pass(pixels: np.ndarray, out: np.ndarray) -> None:
    """CPU pass via an int8 GEMM: uint8 (R, L) contiguous -> Pillow outputs written to ``out`` uint8 (32, R).

    Pixels are shifted to ``q = p - 128`` (int8); the GEMM gives, per output, the three partial sums
    ``P_j = sum_i q_i d_j[i]`` of the coefficient digits ``w = d_0 + 256 d_1 + 65536 d_2``. Pillow's
    ``(sum_i p_i w_i + 2**21) >> 22`` is then ``(P_0 + 256 P_1 + 65536 P_2 + bias) >> 22`` with
    ``bias = 128 sum_i w_i + 2**21``, evaluated in int32 without overflow by carrying ``P_1``'s high
    bits into ``P_2``: with ``t = 256 (P_1 & 255) + P_0 + bias`` and ``u = P_2 + (P_1 >> 8) + (t >> 16)``
    the sum is ``65536 u + (t & 65535)``, whose floor division by ``2**22`` is ``u >> 6``.
    Outputs are computed in bands (:func:`_int8_bands`) so the GEMM skips the zero weights outside
    each band's windows. The elementwise steps run in numpy (single-threaded SIMD, in place).
    """
    n_rows, length = pixels.shape
    if pixels.size % 8 == 0:
        shifted = np.bitwise_xor(pixels.reshape(-1).view(np.uint64), _SIGN_FLIP_8X)
    else:
        shifted = np.bitwise_xor(pixels, np.uint8(128))
    shifted = shifted.view(np.int8).reshape(n_rows, length)
    for first, last, out_first, out_last, pad, digits, bias in _int8_bands(length):
        band = shifted[:, first:last]
        if pad:
            band = np.pad(band, ((0, 0), (0, pad)))
        # (3 n, w) @ (w, R): digits-major output, so every elementwise step below is contiguous
        partial = torch._int_mm(digits, torch.from_numpy(band).t()).numpy()
        n = out_last - out_first
        p0, p1, p2 = partial[:n], partial[n : 2 * n], partial[2 * n :]
        carry = np.bitwise_and(p1, 255)
        carry <<= 8
        carry += p0
        carry += bias[:, None]
        carry >>= 16
        carry += p2
        high = p1 >> 8
        high += carry
        high >>= 6
        np.clip(high, 0, 255, out=high)
        out[out_first:out_last] = high


_INT32_SAFE_DEPTH = 1400  # 8192 * 129 * depth + 2**29.1 < 2**31: the 7-bit combine stays in int32


def _base128_digits(weights: np.ndarray) -> list[np.ndarray]:
    """int64 (n, w) weights -> 3 or 4 signed base-128 digits (n, w) each in -64..63, least significant first."""
    digits = []
    rest = weights.copy()
    while len(digits) < 3 or rest.any():
        digit = ((rest + 64) % 128) - 64
        digits.append(digit)
        rest = (rest - digit) // 128
    if len(digits) > 4:  # pragma: no cover - |w| <= 2**22 always fits four digits
        raise AssertionError("Lanczos coefficient does not fit four base-128 digits")
    return digits


@functools.lru_cache(maxsize=4096)
def _int8_7bit_bands(in_size: int) -> tuple[tuple[int, int, int, int, int, torch.Tensor, int, np.ndarray], ...]:
    """The GEMM operands of one ``"int8_7bit"`` pass, in bands of outputs as :func:`_int8_bands`.

    Per band: (first input column, last + 1, first output, last + 1, zero columns to pad the input with,
    int8 (w, d n) digits matrix [digit 0 of the n outputs | digit 1 | ...], d (3 or 4), int32 (n,) bias
    ``128 sum_i w_i + 2**21``). Bands are narrowed (more groups of outputs) until each reads at most
    :data:`_INT32_SAFE_DEPTH` input columns; where even one output's window is wider (inputs longer than
    ~7,400 pixels) the result is empty and :func:`_resample_rows` runs that pass in float64 instead.
    """
    weights = lanczos_coefficients(in_size)  # (32, in_size)
    for groups in ((4, 8, 16, 32) if in_size >= 4 * RESIZE_SIDE else (1, 4, 8, 16, 32)):
        per_group = RESIZE_SIDE // groups
        windows = []
        for group in range(groups):
            used = np.flatnonzero(weights[group * per_group : (group + 1) * per_group].any(axis=0))
            windows.append((int(used[0]), int(used[-1]) + 1))
        if max(last - first for first, last in windows) <= _INT32_SAFE_DEPTH:
            break
    else:
        return ()
    bands = []
    for group, (first, last) in enumerate(windows):
        rows = weights[group * per_group : (group + 1) * per_group]
        if last - first < _MIN_GEMM_DEPTH:
            first = max(0, min(first, in_size - _MIN_GEMM_DEPTH))
            last = min(in_size, first + _MIN_GEMM_DEPTH)
        pad = max(0, _MIN_GEMM_DEPTH - (last - first))
        digits = _base128_digits(np.pad(rows[:, first:last], ((0, 0), (0, pad))))
        matrix = np.ascontiguousarray(np.concatenate(digits, axis=0).T.astype(np.int8))
        bias = (128 * rows.sum(axis=1) + _ROUNDING).astype(np.int32)
        bands.append((first, last, group * per_group, (group + 1) * per_group, pad, torch.from_numpy(matrix),
                      len(digits), bias))  # fmt: skip
    return tuple(bands)


def _int8_7bit_pass(pixels: np.ndarray, out: np.ndarray) -> None:
    """CPU pass via int8 GEMMs that do not saturate without VNNI: uint8 (R, L) contiguous -> ``out`` uint8 (32, R).

    Pixels are shifted to ``q = p - 128`` (int8, the GEMM's first operand); the weights are split into
    signed base-128 digits ``w = d_0 + 128 d_1 + 128**2 d_2 (+ 128**3 d_3)`` in -64..63 (the second
    operand, see :func:`_int8_7bit_gemm_exact`). The GEMM gives ``P_j = sum_i q_i d_j[i]`` (|P_j| <=
    8192 * depth); Pillow's ``(sum_i p_i w_i + 2**21) >> 22`` is ``(t + 2**14 v) >> 22`` with
    ``t = P_0 + 128 P_1 + bias``, ``v = P_2 + 128 P_3`` and ``bias = 128 sum_i w_i + 2**21``, which is
    ``((t >> 14) + v) >> 8``: every term fits int32 for bands of at most :data:`_INT32_SAFE_DEPTH` columns.
    The GEMM reads the band in place (row stride L); its (R, d n) result is transposed once so the
    elementwise steps run on contiguous rows of R values.
    """
    n_rows, length = pixels.shape
    if pixels.size % 8 == 0:
        shifted = np.bitwise_xor(pixels.reshape(-1).view(np.uint64), _SIGN_FLIP_8X)
    else:
        shifted = np.bitwise_xor(pixels, np.uint8(128))
    shifted = shifted.view(np.int8).reshape(n_rows, length)
    for first, last, out_first, out_last, pad, matrix, n_digits, bias in _int8_7bit_bands(length):
        band = shifted[:, first:last]
        if pad:
            band = np.pad(band, ((0, 0), (0, pad)))
        partial = np.ascontiguousarray(torch._int_mm(torch.from_numpy(band), matrix).numpy().T)  # (d n, R)
        n = out_last - out_first
        total = partial[n : 2 * n]
        total *= 128
        total += partial[:n]
        total += bias[:, None]
        total >>= 14
        total += partial[2 * n : 3 * n]
        if n_digits == 4:
            high = partial[3 * n :]
            high *= 128
            total += high
        total >>= 8
        np.clip(total, 0, 255, out=total)
        out[out_first:out_last] = total


# --------------------------------------------------------------------------------------------
# Resize to 32 x 32
# --------------------------------------------------------------------------------------------


def pillow_lanczos_resize(images: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """``Image.resize((32, 32), LANCZOS)`` of a batch of same-size grayscale images, bit-exact.

    ``images``: uint8 (B, H, W) on any device. Returns uint8 (B, 32, 32) on the same device.
    ``path``: the CPU path (:func:`cpu_path`; ``None``: ``$GREN_PHASH_PATH`` or the calibrated choice);
    other devices always take the float64 path. On CPU, sub-batches run on :func:`_cpu_pool`'s workers
    (about :data:`_ROWS_PER_TASK` rows each for the GEMM paths).
    """
    _check_uint8_batch(images)
    kernel = _kernel_for(images.device, path)
    if images.shape[0] == 0:
        return images.new_zeros((0, RESIZE_SIDE, RESIZE_SIDE))
    if images.device.type != "cpu":
        return _resize_same_size(images, kernel)
    return _resize_cpu(images, kernel)


def _resize_cpu(images: torch.Tensor, kernel: str) -> torch.Tensor:
    """CPU body of :func:`pillow_lanczos_resize` for one named path: uint8 (B, H, W), B >= 1 -> (B, 32, 32)."""
    if kernel == "pillow":
        return _pillow_resize_parallel(list(images))
    batch, height, width = images.shape
    per_task = max(1, _ROWS_PER_TASK // max(height, width))
    if batch <= per_task:
        return _cpu_pool().submit(_resize_same_size, images, kernel).result()
    parts = list(_cpu_pool().map(functools.partial(_resize_same_size, kernel=kernel), images.split(per_task)))
    return torch.cat(parts)


def _resize_same_size(images: torch.Tensor, kernel: str) -> torch.Tensor:
    """Serial body of :func:`pillow_lanczos_resize` for the GEMM kernels ("int8", "float64"):
    uint8 (B, H, W), B >= 1 -> uint8 (B, 32, 32)."""
    batch, height, width = images.shape
    if vertical_first(height, width):
        columns = images.transpose(1, 2).reshape(batch * width, height)
        first = _resample_rows(columns, kernel)  # (B*W, 32): [x, yy]
        first = first.reshape(batch, width, RESIZE_SIDE).transpose(1, 2).reshape(batch * RESIZE_SIDE, width)
        return _resample_rows(first, kernel).reshape(batch, RESIZE_SIDE, RESIZE_SIDE).contiguous()  # [yy, xx]
    first = _resample_rows(images.reshape(batch * height, width), kernel)  # (B*H, 32): [y, xx]
    first = first.reshape(batch, height, RESIZE_SIDE).transpose(1, 2).reshape(batch * RESIZE_SIDE, height)
    second = _resample_rows(first, kernel).reshape(batch, RESIZE_SIDE, RESIZE_SIDE)
    return second.transpose(1, 2).contiguous()


def _pillow_resize_serial(images: Sequence[torch.Tensor]) -> np.ndarray:
    """Pillow's own ``Image.resize((32, 32), LANCZOS)`` of each uint8 (h_i, w_i) CPU image: (N, 32, 32).

    This is the definition imagehash uses, hence exact by construction on every Pillow version.
    """
    from PIL import Image

    out = np.empty((len(images), RESIZE_SIDE, RESIZE_SIDE), dtype=np.uint8)
    for index, image in enumerate(images):
        thumbnail = Image.fromarray(np.ascontiguousarray(image.numpy())).resize(
            (RESIZE_SIDE, RESIZE_SIDE), Image.Resampling.LANCZOS
        )
        out[index] = np.asarray(thumbnail)
    return out


def _pillow_resize_parallel(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`_pillow_resize_serial` split over :func:`_cpu_pool` (Pillow releases the GIL while it
    resamples): uint8 (h_i, w_i) CPU images -> uint8 (N, 32, 32)."""
    if not images:
        return torch.zeros((0, RESIZE_SIDE, RESIZE_SIDE), dtype=torch.uint8)
    workers = max(1, torch.get_num_threads())
    share = max(8, -(-len(images) // workers))
    parts = [images[start : start + share] for start in range(0, len(images), share)]
    if len(parts) == 1:
        return torch.from_numpy(_pillow_resize_serial(parts[0]))
    return torch.from_numpy(np.concatenate(list(_cpu_pool().map(_pillow_resize_serial, parts))))


def _resize_varied(images: Sequence[torch.Tensor], kernel: str) -> torch.Tensor:
    """Resize images of different sizes (uint8 (h_i, w_i), one device) to uint8 (N, 32, 32), GEMM kernels.

    Pass inputs of equal length share one GEMM: first passes are grouped by the resampled length, the
    second passes by the first pass's row count, so crops of many sizes still hash in few large calls.
    """
    count = len(images)
    orders = [vertical_first(int(im.shape[0]), int(im.shape[1])) for im in images]
    first_inputs = [im.t() if order else im for im, order in zip(images, orders)]  # (rows_i, length_i)

    first_outputs: list[torch.Tensor | None] = [None] * count
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, rows in enumerate(first_inputs):
        by_length[int(rows.shape[1])].append(index)
    for members in by_length.values():
        stacked = torch.cat([first_inputs[i].reshape(-1, first_inputs[i].shape[1]) for i in members])
        resampled = _resample_rows(stacked, kernel)
        offset = 0
        for i in members:
            n_rows = int(first_inputs[i].shape[0])
            first_outputs[i] = resampled[offset : offset + n_rows]
            offset += n_rows

    device = images[0].device
    result = torch.empty((count, RESIZE_SIDE, RESIZE_SIDE), dtype=torch.uint8, device=device)
    by_rows: dict[int, list[int]] = defaultdict(list)
    for index, out in enumerate(first_outputs):
        by_rows[int(out.shape[0])].append(index)
    for n_rows, members in by_rows.items():
        stacked = torch.stack([first_outputs[i].t() for i in members]).reshape(-1, n_rows)
        second = _resample_rows(stacked, kernel).view(len(members), RESIZE_SIDE, RESIZE_SIDE)
        for slot, i in enumerate(members):
            # horizontal-first: second pass output is [xx, yy]; vertical-first: [yy, xx]
            result[i] = second[slot] if orders[i] else second[slot].t()
    return result


# --------------------------------------------------------------------------------------------
# Choosing the CPU path at run time
# --------------------------------------------------------------------------------------------

CPU_PATHS = ("int8", "int8_7bit", "pillow", "float64")
"""The exact CPU resize paths: int8 GEMMs (VNNI only), int8 GEMMs with 7-bit weight digits (exact without
VNNI too), Pillow's own resize per image, float64 GEMMs."""
PHASH_PATH_ENV = "GREN_PHASH_PATH"
"""Environment variable overriding the CPU path: one of :data:`CPU_PATHS` or ``auto`` (the default)."""
_AUTO_CANDIDATES = CPU_PATHS
_CALIBRATION_IMAGES = 16
_CALIBRATION_SIDE = 512  # the NIH sample's size; lung crops are ~150-300 px
_CALIBRATION_REPEATS = 3


class PhashPathError(GrenError, ValueError):
    """An unknown or unusable pHash CPU path (argument or ``$GREN_PHASH_PATH``)."""


def path_usable(path: str) -> bool:
    """Whether the CPU path ``path`` (one of :data:`CPU_PATHS`) is exact on this CPU: the int8 paths
    depend on how the CPU's int8 GEMMs accumulate (:func:`_int8_gemm_exact`, :func:`_int8_7bit_gemm_exact`)."""
    if path == "int8":
        return _int8_gemm_exact()
    if path == "int8_7bit":
        return _int8_7bit_gemm_exact()
    return path in CPU_PATHS


def cpu_path(path: str | None = None) -> str:
    """The CPU path a :func:`phash` call with this ``path`` argument uses: one of :data:`CPU_PATHS`.

    Precedence: the ``path`` argument, else ``$GREN_PHASH_PATH``, else ``"auto"``. ``"auto"`` is
    :func:`calibrate`'s choice (measured once per process). An unknown name, or an int8 path on a CPU
    whose int8 GEMMs are not exact for it (:func:`path_usable`), raises :class:`PhashPathError` rather
    than return wrong bits.
    """
    source = "argument"
    if path is None:
        path, source = os.environ.get(PHASH_PATH_ENV, "auto"), f"${PHASH_PATH_ENV}"
    choice = str(path).strip().lower()
    if choice == "auto":
        return calibrate()["choice"]
    if choice not in CPU_PATHS:
        raise PhashPathError(
            f"pHash path {path!r} (from the {source}) is not one of: auto, {', '.join(CPU_PATHS)}"
        )
    if not path_usable(choice):
        others = ", ".join(repr(other) for other in ("auto", *CPU_PATHS) if other == "auto" or path_usable(other))
        raise PhashPathError(
            f"pHash path {choice!r} (from the {source}) is not exact on this CPU: its int8 GEMMs saturate "
            f"(no VNNI); use one of {others}"
        )
    return choice


def _kernel_for(device: torch.device, path: str | None) -> str:
    """The resize kernel for images on ``device``: the CPU path, or ``"float64"`` off the CPU."""
    if device.type == "cpu":
        return cpu_path(path)
    if path is not None and str(path).strip().lower() not in ("auto", "float64"):
        raise PhashPathError(f"pHash path {path!r} is a CPU path; images on {device} take the float64 path")
    return "float64"


def _calibration_batch() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Deterministic full-range noise: uint8 (16, 512, 512) for timing and checking, plus odd-size images
    (both pass orders, upsampling) for checking only. Noise is what makes saturating int8 GEMMs fail."""
    rng = np.random.default_rng(16)
    side, count = _CALIBRATION_SIDE, _CALIBRATION_IMAGES
    batch = torch.from_numpy(rng.integers(0, 256, size=(count, side, side), dtype=np.uint8))
    odd = [torch.from_numpy(rng.integers(0, 256, size=shape, dtype=np.uint8))
           for shape in ((37, 91), (300, 120), (130, 47), (20, 17), (257, 513))]  # fmt: skip
    return batch, odd


_CALIBRATION: dict | None = None
_CALIBRATION_LOCK = threading.Lock()


def calibrate(force: bool = False) -> dict:
    """Time the candidate CPU paths once per process and pick the fastest exact one.

    Candidates: ``"pillow"`` (Pillow's own resize: exact by definition, the reference), ``"float64"``,
    and the int8 paths where their GEMMs are exact (:func:`path_usable`). Each candidate resizes
    :func:`_calibration_batch` (16 noise images of 512 x 512, through the same worker pool as real calls)
    and its thumbnails, odd sizes included, must equal Pillow's; a candidate that differs is dropped with
    a warning. Speed is this process's CPU time (all threads) per image, best of 3 rounds that alternate
    the candidates after a warm-up: CPU time, unlike wall time, hardly moves when other jobs share the
    cores, and every path spreads over the same workers. Takes ~0.3-0.6 s. Returns ``{"choice": path,
    "images_per_s": {path: images per CPU-second}, "exact": {path: bool}, "usable": {path: bool}}``;
    cached (``force=True`` measures again).
    """
    global _CALIBRATION
    with _CALIBRATION_LOCK:
        if _CALIBRATION is not None and not force:
            return _CALIBRATION
        batch, odd = _calibration_batch()
        reference = _pillow_resize_parallel(list(batch))
        reference_odd = _pillow_resize_parallel(odd)
        exact: dict[str, bool] = {}
        usable = {candidate: path_usable(candidate) for candidate in _AUTO_CANDIDATES}
        for candidate in _AUTO_CANDIDATES:
            if not usable[candidate]:
                exact[candidate] = False
                continue
            thumbnails = _resize_cpu(batch, candidate)  # warm-up: coefficient caches, pool threads
            exact[candidate] = bool(torch.equal(thumbnails, reference)) and all(
                torch.equal(_resize_cpu(image[None], candidate)[0], expected)
                for image, expected in zip(odd, reference_odd)
            )
            if not exact[candidate]:
                logger.warning("pHash path %r differs from Pillow's resize on this machine; not used", candidate)
        timed = [candidate for candidate in _AUTO_CANDIDATES if exact[candidate]]
        best = dict.fromkeys(timed, math.inf)
        for _ in range(_CALIBRATION_REPEATS):
            for candidate in timed:
                start = time.process_time()
                _resize_cpu(batch, candidate)
                best[candidate] = min(best[candidate], time.process_time() - start)
        rates = {candidate: len(batch) / max(seconds, 1e-9) for candidate, seconds in best.items()}
        choice = max(rates, key=rates.get)
        logger.info(
            "pHash CPU path: %s (calibration, %d images of %d px, images per CPU-second: %s)", choice, len(batch),
            _CALIBRATION_SIDE, ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items()),
        )
        _CALIBRATION = {"choice": choice, "images_per_s": rates, "exact": exact, "usable": usable}
        return _CALIBRATION


# --------------------------------------------------------------------------------------------
# DCT, median, bits
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _dct_matrix(device: torch.device) -> torch.Tensor:
    """float64 (8, 32): the first 8 rows of scipy.fftpack's unnormalised DCT-II matrix."""
    k = torch.arange(HASH_SIDE, dtype=torch.float64)[:, None]
    n = torch.arange(RESIZE_SIDE, dtype=torch.float64)[None, :]
    return (2.0 * torch.cos(math.pi * k * (2 * n + 1) / (2 * RESIZE_SIDE))).to(device)


def _low_dct(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 32, 32) -> float64 (B, 8, 8): the top-left block of ``dct(dct(x, axis=0), axis=1)``."""
    if pixels.device.type == "cpu":
        import scipy.fftpack

        array = pixels.numpy()
        full = scipy.fftpack.dct(scipy.fftpack.dct(array, axis=1), axis=2)
        return torch.from_numpy(np.ascontiguousarray(full[:, :HASH_SIDE, :HASH_SIDE]))
    return _low_dct_matmul(pixels)


def _low_dct_matmul(pixels: torch.Tensor) -> torch.Tensor:
    """The same block as ``C @ X @ C.T`` in float64 on the pixels' device (CUDA path)."""
    basis = _dct_matrix(pixels.device)
    return basis @ pixels.to(torch.float64) @ basis.T


def _bits_from_low(low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (B, 8, 8) -> (bool (B, 64) bits, float64 (B,) distance of the nearest value to the median)."""
    flat = low.reshape(low.shape[0], HASH_BITS)
    ordered = torch.sort(flat, dim=1).values
    median = (ordered[:, HASH_BITS // 2 - 1] + ordered[:, HASH_BITS // 2]) / 2
    bits = flat > median[:, None]
    margin = (flat - median[:, None]).abs().amin(dim=1)
    return bits, margin


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_uint8_batch(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(
            f"expected a uint8 tensor (B, H, W) of grayscale images, got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"images must be at least 1 x 1 pixels, got {tuple(images.shape[1:])}")


def _to_gray_tensor(item) -> torch.Tensor:
    """One list element (PIL image, uint8 2-D array or tensor) as uint8 (H, W) tensor."""
    if isinstance(item, torch.Tensor):
        tensor = item
    elif isinstance(item, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(item))
    else:
        from PIL import Image

        if not isinstance(item, Image.Image):
            raise TypeError(
                f"cannot hash a {type(item).__name__}: expected a PIL image or a uint8 (H, W) array"
            )
        from gren.core.imageio import pil_to_gray

        tensor = torch.from_numpy(pil_to_gray(item))
    if tensor.dtype != torch.uint8 or tensor.dim() != 2:
        raise ValueError(f"expected a uint8 (H, W) grayscale image, got {tensor.dtype} {tuple(tensor.shape)}")
    if tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise ValueError(f"images must be at least 1 x 1 pixels, got {tuple(tensor.shape)}")
    return tensor


def resize32(x, path: str | None = None) -> torch.Tensor:
    """The exact 32 x 32 LANCZOS thumbnails pHash is taken on: uint8 (B, 32, 32).

    ``x`` and ``path`` as for :func:`phash`. Device follows a tensor input; CPU otherwise.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        if x.dim() == 2:
            x = x.unsqueeze(0)
        _check_uint8_batch(x)
        return pillow_lanczos_resize(x, path)
    items = [_to_gray_tensor(item) for item in x]
    if not items:
        _kernel_for(torch.device("cpu"), path)  # a bad path is reported even for an empty list
        return torch.zeros((0, RESIZE_SIDE, RESIZE_SIDE), dtype=torch.uint8)
    devices = {item.device for item in items}
    if len(devices) > 1:
        raise ValueError(f"all images must be on one device, got {sorted(str(d) for d in devices)}")
    shapes = {tuple(item.shape) for item in items}
    if len(shapes) == 1:
        return pillow_lanczos_resize(torch.stack(items), path)
    kernel = _kernel_for(items[0].device, path)
    if items[0].device.type != "cpu":
        return _resize_varied(items, kernel)
    if kernel == "pillow":
        return _pillow_resize_parallel(items)
    workers = max(1, torch.get_num_threads())
    share = -(-len(items) // workers)
    parts = [items[start : start + share] for start in range(0, len(items), share)]
    return torch.cat(list(_cpu_pool().map(functools.partial(_resize_varied, kernel=kernel), parts)))


def phash_with_margin(x, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`phash` plus, per image, the distance (DCT units) of the nearest low coefficient to the median.

    A margin below :data:`TIE_MARGIN` means the bits of tied coefficients are floating-point noise
    (flat or striped images); imagehash's output is then arbitrary too.
    Returns (bool (B, 64), float64 (B,)), on the input's device. ``path`` as for :func:`phash`.
    """
    thumbnails = resize32(x, path)
    return _bits_from_low(_low_dct(thumbnails))


def phash(x, path: str | None = None) -> torch.Tensor:
    """Perceptual hashes of a batch of images, bit-exact with ``imagehash.phash`` (hash_size 8).

    ``x``: a uint8 tensor or numpy array (B, H, W) (or (H, W) for one image) of grayscale pixels, or a
    sequence of PIL images (any mode and size; converted as ``convert('L')``, 16-bit images by their bit
    depth as :func:`gren.core.imageio.pil_to_gray` does) and / or uint8 (H, W) arrays or tensors of any sizes.
    Returns a bool tensor (B, 64) in imagehash's bit order (row-major over the 8 x 8 low block,
    bit = coefficient > median), on the input tensor's device (CPU for arrays and PIL images).

    ``path``: how the CPU resizes, one of :data:`CPU_PATHS` or ``"auto"`` (see :func:`cpu_path`);
    ``None`` reads ``$GREN_PHASH_PATH`` (default ``auto``: the faster exact path, measured once per
    process). Every path returns the same bits. Inputs on other devices (CUDA) take the float64 path.
    """
    return phash_with_margin(x, path)[0]


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances: bool (N, 64) and bool (M, 64) -> int64 (N, M), counts 0..64."""
    a, b = _as_bits(a, "a"), _as_bits(b, "b")
    af, bf = a.to(torch.float32), b.to(torch.float32)
    # |a xor b| = a.(1-b) + (1-a).b; float32 sums of at most 64 ones are exact
    differing = af @ (1.0 - bf).T + (1.0 - af) @ bf.T
    return differing.round().to(torch.int64)


def hamming_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-aligned Hamming distances: bool (N, 64) and bool (N, 64) -> int64 (N,)."""
    a, b = _as_bits(a, "a"), _as_bits(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"hamming_pairs needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a != b).sum(dim=-1)


def _as_bits(bits, name: str) -> torch.Tensor:
    if isinstance(bits, np.ndarray):
        bits = torch.from_numpy(bits)
    if bits.dim() == 1:
        bits = bits.unsqueeze(0)
    if bits.dim() != 2 or bits.shape[1] != HASH_BITS:
        raise ValueError(f"{name}: expected hash bits (N, {HASH_BITS}), got {tuple(bits.shape)}")
    return bits.to(torch.bool)


def to_hex(bits) -> str | list[str]:
    """Hash bits as imagehash prints them: bool (64,) -> 16 hex digits; (N, 64) -> list of N strings."""
    tensor = torch.as_tensor(np.asarray(bits.cpu() if isinstance(bits, torch.Tensor) else bits))
    single = tensor.dim() == 1
    rows = _as_bits(tensor, "bits").to(torch.int64)
    weights = torch.tensor([1 << (3 - i) for i in range(4)], dtype=torch.int64)
    nibbles = (rows.view(-1, HASH_BITS // 4, 4) * weights).sum(dim=2)
    texts = ["".join("0123456789abcdef"[v] for v in row) for row in nibbles.tolist()]
    return texts[0] if single else texts


def from_hex(text: str | Sequence[str]) -> torch.Tensor:
    """Inverse of :func:`to_hex`: 16 hex digits -> bool (64,); a list of N strings -> bool (N, 64)."""
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    rows = []
    for value in texts:
        value = value.strip()
        if len(value) != HASH_BITS // 4:
            raise ValueError(f"expected {HASH_BITS // 4} hex digits, got {value!r}")
        try:
            number = int(value, 16)
        except ValueError as err:
            raise ValueError(f"not a hexadecimal hash: {value!r}") from err
        rows.append([(number >> (HASH_BITS - 1 - i)) & 1 for i in range(HASH_BITS)])
    bits = torch.tensor(rows, dtype=torch.bool).reshape(len(rows), HASH_BITS)
    return bits[0] if single else bits
