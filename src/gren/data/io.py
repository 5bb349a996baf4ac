"""Image file I/O: decode any chest X-ray file to 8-bit grayscale, and read sizes without decoding.

Accepted files: anything Pillow opens -- 8-bit and 16-bit grayscale PNG, JPEG, RGB / RGBA / LA,
palette ('P') and bilevel ('1') images. Everything comes back as one 8-bit channel:

* colour, palette and alpha images are converted as Pillow's ``convert('L')`` does
  (luma ``L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16``; alpha ignored), so hashes computed on our
  arrays match ``imagehash`` on the same file;
* 16-bit images ('I;16', 'I;16B', 'I') are scaled *by their bit depth*, not per image: the smallest
  container of 8, 10, 12, 14 or 16 bits that holds the image's maximum is taken as the stored depth
  and the values are mapped linearly ``round(v * 255 / (2**bits - 1))``. An 8-bit image stored in a
  16-bit PNG stays unchanged; a 12-bit hospital PNG (max <= 4095) is divided by 4095/255; a full-range
  16-bit one by 65535/255. Unlike per-image min-max this keeps relative brightness between images
  of the same depth and never stretches a nearly constant image into noise;
* float images ('F') are min-max scaled to 0..255 (no depth to go by).

Unreadable files (not an image, truncated, corrupt) raise :class:`gren.errors.ImageReadError`
naming the file. Pillow's global ``LOAD_TRUNCATED_IMAGES`` is left alone (truncated files are errors).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from gren.errors import ImageReadError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
"""Suffixes (compared lower-case) of the files taken for images."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DEPTHS = (8, 10, 12, 14, 16)

# Decoding errors Pillow and its codecs raise for bad files.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` in pixels of an image file, read from its header (no pixel decoding).

    Raises :class:`ImageReadError` naming the file when it is not a readable image.
    """
    try:
        with Image.open(path) as image:
            return int(image.size[0]), int(image.size[1])
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: image file not found") from err
    except _DECODE_ERRORS as err:
        raise ImageReadError(f"{path}: not a readable image ({err})") from err


def sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map a 16-bit (or wider int) image to uint8 by its bit depth (see the module docstring).

    ``values``: integer array (H, W), non-negative. Returns uint8 (H, W).
    """
    values = np.asarray(values)
    peak = int(values.max()) if values.size else 0
    if peak < 0:
        peak = 0
    bits = next((b for b in _DEPTHS if peak <= (1 << b) - 1), 16)
    if bits == 8:
        return np.clip(values, 0, 255).astype(np.uint8)
    scale = 255.0 / float((1 << bits) - 1)
    scaled = np.clip(values, 0, (1 << bits) - 1).astype(np.float32) * scale
    return np.rint(scaled).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.where(finite, values, low) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def pil_to_gray(image: Image.Image) -> np.ndarray:
    """A decoded PIL image as uint8 (H, W) grayscale, by the rules in the module docstring."""
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in _SIXTEEN_BIT_MODES:
        return sixteen_bit_to_uint8(np.asarray(image))
    if mode == "F":
        return _float_to_uint8(np.asarray(image))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to uint8 (H, W) grayscale at its own size (pixels of the file).

    Raises :class:`ImageReadError` naming the file when it is missing, not an image, truncated or
    corrupt.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_gray(image)
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: image file not found") from err
    except _DECODE_ERRORS as err:
        raise ImageReadError(f"{path}: cannot decode image ({err})") from err


def read_gray_resized(path: str | os.PathLike, size: int | tuple[int, int]) -> np.ndarray:
    """Decode ``path`` to grayscale and resize it to ``size`` (``S`` or ``(width, height)``) pixels.

    Bilinear with Pillow's antialiasing on reduction; the aspect ratio is not kept (NIH images are
    square). Returns uint8 (H, W) = (S, S) for an int ``size``.
    """
    width, height = (size, size) if isinstance(size, int) else size
    gray = read_gray(path)
    if gray.shape == (height, width):
        return gray
    resized = Image.fromarray(gray, mode="L").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def read_mask(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Read a label mask (uint8 values such as 0/1/2) and optionally resize it with NEAREST.

    Returns uint8 (H, W). Raises :class:`ImageReadError` naming the file when unreadable.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _SIXTEEN_BIT_MODES:
                mask = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
            elif image.mode == "P":
                # Palette masks store the class in the index, not in the colour.
                mask = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L")
            else:
                mask = image.convert("L")
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: mask file not found") from err
    except _DECODE_ERRORS as err:
        raise ImageReadError(f"{path}: cannot decode mask ({err})") from err
    if size is not None:
        width, height = (size, size) if isinstance(size, int) else size
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(mask, dtype=np.uint8).copy()
