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
* float images ('F') are min-max scaled to 0..255 (no depth to go by);
* DICOM (``.dcm`` / ``.dicom``, or the ``DICM`` magic at byte 128) with the optional ``pydicom``
  (``pip install 'gren[dicom]'``): modality LUT (rescale slope / intercept), then the file's VOI
  window when it has one (else the 0.5-99.5 percentile range) to 8 bits, MONOCHROME1 inverted,
  colour frames by luma. Without pydicom a ``.dcm`` file is an :class:`ImageReadError` naming the extra.

Limits: an image of more than ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels (about 179 M with Pillow's
default, e.g. 14000 x 14000) is refused before its pixels are decoded -- Pillow's decompression-bomb
rule, applied to DICOM too from the header's Rows x Columns x frames. Set ``Image.MAX_IMAGE_PIXELS``
to change it (``None``: no limit).

EXIF orientation is ignored (decision): pixels are used as stored, because the boxes of a label list
are given in stored-pixel coordinates, because ``imagehash``'s pHash (which our hashes match
bit-exactly) is defined on the stored pixels, and because NIH PNGs and DICOM-derived files carry no
EXIF. A JPEG whose orientation tag says it should be rotated is logged (once per process, with the
file; every further one at debug level).

Unreadable files (not an image, truncated, corrupt) raise :class:`gren.core.errors.ImageReadError`
naming the file. Pillow's global ``LOAD_TRUNCATED_IMAGES`` is left alone (truncated files are errors).
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
from PIL import Image, UnidentifiedImageError

from gren.core.errors import ImageReadError

log = logging.getLogger(__name__)

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
"""Suffixes (lower-case) of DICOM files; read with the optional pydicom (``gren[dicom]``)."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)
"""Suffixes (compared lower-case) of the files taken for images."""

DICOM_EXTRA_HINT = "install it with `pip install 'gren[dicom]'` (or `pip install pydicom`)"

_EXIF_ORIENTATION = 0x0112
_exif_warned = threading.Event()

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_DEPTHS = (8, 10, 12, 14, 16)

# Decoding errors Pillow and its codecs raise for bad files.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def is_image_file(path: str | os.PathLike) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case), DICOM suffixes included
    (reading one needs pydicom; without it the read is an :class:`ImageReadError` naming the extra)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def has_dicom_suffix(path: str | os.PathLike) -> bool:
    """True for a ``.dcm`` / ``.dicom`` suffix (any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in DICOM_SUFFIXES


def is_dicom(path: str | os.PathLike) -> bool:
    """A DICOM suffix, or the ``DICM`` magic at byte 128 (files without a suffix)."""
    if has_dicom_suffix(path):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def max_image_pixels() -> int | None:
    """Pixels beyond which an image is refused unread: Pillow's decompression-bomb error threshold
    (``2 * Image.MAX_IMAGE_PIXELS``), ``None`` when Pillow's limit is switched off."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def _check_pixels(path: str | os.PathLike, width: int, height: int, frames: int = 1) -> None:
    limit = max_image_pixels()
    pixels = int(width) * int(height) * max(int(frames), 1)
    if limit is not None and pixels > limit:
        raise ImageReadError(
            f"{path}: image of {width} x {height} pixels{f' x {frames} frames' if frames > 1 else ''} "
            f"({pixels:,} pixels) exceeds the limit of {limit:,} pixels (PIL.Image.MAX_IMAGE_PIXELS x 2); "
            "not decoded. Raise PIL.Image.MAX_IMAGE_PIXELS if the file is genuine")


def _pydicom():
    try:
        import pydicom
    except ImportError:
        return None
    return pydicom


def _dicom_header(path: str | os.PathLike):
    """The DICOM header of ``path`` (no pixel data read); ImageReadError for a bad file or no pydicom."""
    pydicom = _pydicom()
    if pydicom is None:
        raise ImageReadError(f"{path}: reading DICOM needs pydicom, which is not installed; {DICOM_EXTRA_HINT}")
    try:
        return pydicom.dcmread(os.fspath(path), stop_before_pixels=True)
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: image file not found") from err
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for bad files
        raise ImageReadError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from err


def _dicom_dims(path: str | os.PathLike, header) -> tuple[int, int, int]:
    try:
        width, height = int(header.Columns), int(header.Rows)
        frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as err:
        raise ImageReadError(f"{path}: DICOM file without valid image dimensions (Rows/Columns/NumberOfFrames); "
                             "expected a 2-D X-ray image") from err
    if width <= 0 or height <= 0:
        raise ImageReadError(f"{path}: DICOM image of {width} x {height} pixels; expected a 2-D X-ray image")
    return width, height, frames


def dicom_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of a DICOM image from its header (pixel data not read)."""
    width, height, frames = _dicom_dims(path, _dicom_header(path))
    _check_pixels(path, width, height, frames)
    return width, height


def read_dicom_gray(path: str | os.PathLike) -> np.ndarray:
    """A DICOM file -> uint8 (H, W): modality LUT, VOI window (or percentiles), MONOCHROME1 inverted.

    The header is read first and the pixel limit (:func:`max_image_pixels`) checked before any pixel
    data is decoded. Raises :class:`ImageReadError` naming the file (and the ``gren[dicom]`` extra
    when pydicom is missing).
    """
    header = _dicom_header(path)
    width, height, frames = _dicom_dims(path, header)
    _check_pixels(path, width, height, frames)
    pydicom = _pydicom()
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom < 3
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    try:
        ds = pydicom.dcmread(os.fspath(path))
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for bad files
        raise ImageReadError(f"{path}: not a readable DICOM image ({type(err).__name__}: {err})") from None
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):  # colour DICOM: luma
        pixels = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif pixels.ndim != 2:
        raise ImageReadError(f"{path}: DICOM pixel data of shape {pixels.shape}; expected one 2-D frame")
    try:
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    except Exception as err:  # noqa: BLE001 - malformed LUT attributes
        raise ImageReadError(f"{path}: bad DICOM intensity attributes ({type(err).__name__}: {err})") from None
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    values = np.where(finite, values, np.nanmin(np.where(finite, values, np.nan)))
    low, high = np.percentile(values, [0.5, 99.5]) if "WindowCenter" not in ds else (values.min(), values.max())
    if high <= low:
        high = low + 1.0
    gray = np.clip((values - low) / (high - low), 0.0, 1.0)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 1.0 - gray
    return np.rint(gray * 255.0).astype(np.uint8)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` in pixels of an image file, read from its header (no pixel decoding).

    DICOM files are read with pydicom (header only). Raises :class:`ImageReadError` naming the file
    when it is not a readable image or is larger than :func:`max_image_pixels`.
    """
    if has_dicom_suffix(path):
        return dicom_size(path)
    try:
        with Image.open(path) as image:
            return int(image.size[0]), int(image.size[1])
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: image file not found") from err
    except UnidentifiedImageError as err:
        if is_dicom(path):
            return dicom_size(path)
        raise ImageReadError(f"{path}: not a readable image ({err})") from err
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


def _note_orientation(path: str | os.PathLike, image: Image.Image) -> None:
    """Log (once per process, then at debug) that a file's EXIF orientation is ignored."""
    if image.format != "JPEG" and "exif" not in image.info:
        return
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to refuse the pixels
        return
    if orientation in (None, 0, 1):
        return
    if not _exif_warned.is_set():
        _exif_warned.set()
        log.warning("%s: EXIF orientation %s ignored; pixels are used as stored (boxes and hashes refer to "
                    "stored pixels; further such files are logged at debug level)", path, orientation)
    else:
        log.debug("%s: EXIF orientation %s ignored", path, orientation)


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file (PNG, JPEG, ... or DICOM) to uint8 (H, W) grayscale at its own size.

    Raises :class:`ImageReadError` naming the file when it is missing, not an image, truncated,
    corrupt, larger than :func:`max_image_pixels`, or DICOM without pydicom installed.
    """
    if has_dicom_suffix(path):
        return read_dicom_gray(path)
    try:
        with Image.open(path) as image:
            _note_orientation(path, image)
            image.load()
            return pil_to_gray(image)
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: image file not found") from err
    except UnidentifiedImageError as err:
        if is_dicom(path):
            return read_dicom_gray(path)
        raise ImageReadError(f"{path}: cannot decode image ({err})") from err
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"{path}: {err}; not decoded") from err
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
