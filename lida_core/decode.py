"""The one image decoder of lida: bytes -> RGB uint8 pixels, as Pillow decodes them.

Every stage (scan, gallery, training, evaluation, benchmarks) decodes through
`decode_image`, because the fingerprint lives in the lowest bits and two decoders
(or one decoder with different options) disagree exactly there.

Baseline and progressive JPEGs in colour or grey (what Pillow opens as RGB or L) go through
simplejpeg instead of Pillow's own decoder. Both wrap libjpeg-turbo, and with the same
settings (accurate integer DCT, smooth chroma upsampling) they give the same pixels:
tests/test_decode.py checks that bit for bit, on every quality, subsampling and scan mode
Pillow writes, and docs/performance.md gives the speed (half the time of Pillow's decode
and array copy for a 512x512 JPEG). Whatever simplejpeg flags, even a recoverable warning
in a damaged stream, goes to Pillow, which then decodes or refuses it as before. So the
pixels and the refusals are Pillow's either way. CMYK JPEGs and MPO files stay with Pillow.

Rules, each chosen so the stored pixel values reach the fingerprint unchanged:
- No EXIF rotation, no draft/scaled JPEG decoding, no colour management, no resampling.
- RGB: as stored. L / 1: the grey value is copied to the three channels.
- LA / RGBA / RGBa / PA: alpha is dropped, never composited (compositing rewrites low bits).
- P (palette, with or without transparency): looked up through the palette, alpha dropped.
- I;16 / I;16B / I;16L / I: 16-bit samples keep their high byte (a value stored as v*257
  gives back v exactly); values outside 0..65535 are clipped first.
- CMYK: Pillow's fixed CMYK->RGB formula (deterministic; the low bits then come from
  that formula as much as from the source).
- YCbCr / LAB / HSV and other modes Pillow converts to RGB: converted by Pillow.
- F (float) and any mode Pillow cannot convert: refused.
- Multi-frame files (GIF, APNG, TIFF, WebP): the first frame only.
- Decompression bombs: refused when width*height exceeds `max_pixels` (checked from the
  header, before any pixel is decoded). Truncated or corrupt files: refused.
Refusals raise `DecodeError`, which names the file and the reason in one line.

JPEGs in the decoder's own colour space (`jpeg_space="ycc"`, the srm profile's setting). A
colour JPEG stores Y, Cb and Cr; the RGB above is the decoder's fixed-point conversion of them,
rounded and clipped, and that rounding rewrites the low bits where the JPEG's own traces lie.
With "ycc", a colour JPEG (Pillow mode RGB, YCbCr-coded) is decoded by Pillow to YCbCr as the
decoder holds it (chroma upsampled the same smooth way, no conversion) and returned as a
`YCbCrPixels` array: H x W x 3 like any other, marked so that what needs RGB (a JPEG copy, a
blur) converts it with `ycc_to_rgb`, libjpeg's own conversion, bit for bit
(tests/test_decode.py). Grey, CMYK and Adobe-RGB JPEGs, MPO files and every other format
decode as above, in RGB.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

# 64 megapixels: above any generator's output and most photographs; a bomb is far larger.
DEFAULT_MAX_PIXELS = 64_000_000

_GREY_MODES = {"L", "1"}
_ALPHA_DROP = {"LA": "L", "RGBA": "RGB", "RGBa": "RGB", "La": "L", "PA": "P"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


JPEG_FORMATS = ("JPEG", "MPO")  # Pillow's names for JPEG files (MPO: a camera's multi-picture JPEG)
JPEG_SPACES = ("rgb", "ycc")  # how a colour JPEG is handed on (the module's last paragraph)


class YCbCrPixels(np.ndarray):
    """A colour JPEG's pixels as its decoder's Y, Cb, Cr (H x W x 3 uint8); `ycc_to_rgb` gives its RGB."""


_SCALE = 16  # libjpeg's jdcolor.c: fixed point with 16 fractional bits, each product rounded half up


def _fix(x: float) -> int:
    return int(x * (1 << _SCALE) + 0.5)


def ycc_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """libjpeg(-turbo)'s YCbCr -> RGB (jdcolor.c's integer tables), the same pixels its RGB decode gives.

    A plain array (not `YCbCrPixels`) is returned as it is: it is RGB already.
    """
    if not isinstance(ycc, YCbCrPixels):
        return ycc
    v = np.asarray(ycc).astype(np.int32)
    y, cb, cr = v[..., 0], v[..., 1] - 128, v[..., 2] - 128
    half = 1 << (_SCALE - 1)
    r = y + ((_fix(1.40200) * cr + half) >> _SCALE)
    g = y + ((-_fix(0.34414) * cb - _fix(0.71414) * cr + half) >> _SCALE)
    b = y + ((_fix(1.77200) * cb + half) >> _SCALE)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


class DecodeError(ValueError):
    """An input that cannot be decoded; `reason` is short and stable enough for a table."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # H x W x 3, uint8, C-contiguous
    format: str  # container format as Pillow names it (PNG, JPEG, ...)
    mode: str  # the stored pixel mode before conversion
    width: int
    height: int
    frames: int
    quality: int | None = None  # a JPEG's quality as libjpeg would name its quantisation tables (`jpeg_quality`)


# libjpeg's standard quantisation tables (jcparam.c, ITU T.81 annex K), in natural (row-major) order
_STANDARD_TABLES = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
     47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32,
], dtype=np.int64)


def _scaled_tables() -> np.ndarray:
    """100 x 2 x 64: the tables libjpeg's `jpeg_set_quality(q, force_baseline=TRUE)` writes for q = 1..100."""
    q = np.arange(1, 101)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)
    return np.clip((_STANDARD_TABLES[None] * scale[:, None, None] + 50) // 100, 1, 255)


_SCALED_TABLES = _scaled_tables()


def jpeg_quality(tables: dict) -> int | None:
    """The libjpeg quality (1-100) whose scaled standard tables are nearest to a JPEG's, or None.

    `tables`: Pillow's `Image.quantization` ({table id: 64 values in natural order}); the
    luminance table (the lowest id) and, when there is one, the next (chrominance) are compared,
    each value on a log scale. Encoders built on libjpeg (Pillow, most web and camera software
    that offers a "quality") match one quality exactly; a camera's own tables get the nearest.
    The real threshold for a JPEG is calibrated on copies at that quality (`lida_core.decide`).
    """
    try:
        ids = sorted(tables)[:2]
        found = np.array([list(tables[i]) for i in ids], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if found.ndim != 2 or found.shape[1] != 64 or not np.all(found >= 1):
        return None
    error = np.abs(np.log(_SCALED_TABLES[:, : len(ids)]) - np.log(found)[None]).sum((1, 2))
    return 100 - int(np.argmin(error[::-1]))  # ties to the higher quality


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS,
                 jpeg_space: str = "rgb") -> DecodedImage:
    """Decode `data` to RGB uint8 following the module's rules (a colour JPEG to YCbCr with
    `jpeg_space="ycc"`: the module's last paragraph), or raise DecodeError."""
    if jpeg_space not in JPEG_SPACES:
        raise ValueError(f"jpeg_space must be one of {JPEG_SPACES}, got {jpeg_space!r}")
    if not data:
        raise DecodeError(name, "empty file")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and later raises) on large images; we apply our own explicit limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise DecodeError(name, f"invalid size {width}x{height}")
            if width * height > max_pixels:
                raise DecodeError(
                    name, f"decompression bomb: {width}x{height} exceeds the {max_pixels} pixel limit"
                )
            frames = int(getattr(image, "n_frames", 1) or 1)
            if frames > 1:
                image.seek(0)
            pixels = _jpeg_ycc(image, width, height) if jpeg_space == "ycc" else None
            if pixels is None:
                pixels = _jpeg_pixels(data, image)
            if pixels is None:
                image.load()
                pixels = _to_rgb(image, name)
            fmt = image.format or "unknown"
            mode = "RGB" if isinstance(pixels, YCbCrPixels) else image.mode  # the file's, not the draft's raw mode
            quality = jpeg_quality(getattr(image, "quantization", None) or {}) if fmt in JPEG_FORMATS else None
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(name, f"not an image ({_what_it_is(data)})") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(name, f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        if "truncated" in reason.lower():
            reason = "truncated file: " + reason
        raise DecodeError(name, f"corrupt image: {reason}") from None
    if isinstance(pixels, YCbCrPixels):
        return DecodedImage(pixels, fmt, mode, width, height, frames, quality)
    return DecodedImage(np.ascontiguousarray(pixels), fmt, mode, width, height, frames, quality)


def _jpeg_ycc(image: Image.Image, width: int, height: int) -> YCbCrPixels | None:
    """A YCbCr-coded colour JPEG's pixels as its decoder holds them before the RGB conversion; None: not one."""
    if image.format != "JPEG" or image.mode != "RGB" or image.info.get("adobe_transform", 1) == 0:
        return None  # grey, CMYK, Adobe-RGB (transform 0: no YCbCr) and MPO files decode as before
    image.draft("YCbCr", image.size)  # the raw mode only: same size, so no scaled (DCT-domain) decoding
    if image.mode != "YCbCr" or image.size != (width, height):
        # Pillow 12 leaves the mode alone only when the file has several tiles (nothing changed) or
        # its raw mode is not RGB (then only a scale of 1 is recorded): either way the image still
        # decodes as it would have without the draft, so the RGB paths below read it as before.
        return None
    image.load()
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.shape != (height, width, 3):
        return None
    return np.ascontiguousarray(pixels).view(YCbCrPixels)


def _jpeg_pixels(data: bytes, image: Image.Image) -> np.ndarray | None:
    """A colour or grey JPEG's RGB pixels through simplejpeg (the module's first paragraph); None: Pillow decodes it."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    try:
        # Pillow's libjpeg settings: accurate integer DCT, fancy upsampling; strict, so a warning falls back
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
    except (ValueError, RuntimeError, MemoryError):
        return None
    if pixels.shape != (image.height, image.width, 3):  # never seen; Pillow's reading of the header wins
        return None
    return pixels


def _what_it_is(data: bytes) -> str:
    """A short guess at a file Pillow does not open, for the error a user reads."""
    if data[257:262] == b"ustar":
        return "a tar archive: extract it to scan its members"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"heim", b"heis", b"avif"):
        return f"{data[8:12].decode()} (HEIF/AVIF), which this build cannot decode"
    if data[:4] == b"PK\x03\x04":
        return "a zip archive"
    return "unrecognised format"


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
    mode = image.mode
    if mode in _ALPHA_DROP:
        # Take the colour bands as stored; `convert` would composite or premultiply.
        bands = image.split()
        image = Image.merge(_ALPHA_DROP[mode], bands[:-1]) if mode != "PA" else _palette_without_alpha(image)
        mode = image.mode
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        if image.mode == "RGBA":
            image = Image.merge("RGB", image.split()[:3])
        mode = "RGB"
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode in _GREY_MODES:
        grey = np.asarray(image.convert("L"), dtype=np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in _SIXTEEN_BIT:
        wide = np.asarray(image).astype(np.int64)
        grey = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        raise DecodeError(name, "unsupported pixel mode F (floating point)")
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError):
        raise DecodeError(name, f"unsupported pixel mode {mode}") from None


def _palette_without_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    return Image.merge("RGB", rgba.split()[:3])


# ---------------------------------------------------------------- many files in this process


@dataclass
class Decoded:
    uris: list[str]
    image_ids: list[str]
    pixels: list[np.ndarray]
    raw: list[bytes]
    errors: list[tuple[str, str]]
    jpeg: list[bool] = field(default_factory=list)  # per decoded image: a JPEG file
    quality: list[int | None] = field(default_factory=list)  # per decoded image: its JPEG quality (`jpeg_quality`), or None
    dims: list[tuple[int, int]] = field(default_factory=list)  # per decoded image: its pixels' (height, width)


class LazyImages(Sequence):
    """Decoded pixels of kept file bytes, decoded again on each read: memory holds the compressed files only.

    For passes that read each image once or twice (the closed-form fits): 95 camera photographs
    of 24 MP each would otherwise hold 7 GB of pixels at once.
    """

    def __init__(self, raw: Sequence[bytes], names: Sequence[str], jpeg_space: str = "rgb"):
        self.raw, self.names, self.jpeg_space = list(raw), list(names), jpeg_space

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyImages(self.raw[index], self.names[index], self.jpeg_space)
        return decode_image(self.raw[index], self.names[index], jpeg_space=self.jpeg_space).pixels

    def take(self, indexes: Sequence[int]) -> LazyImages:
        return LazyImages([self.raw[i] for i in indexes], [self.names[i] for i in indexes], self.jpeg_space)


def decode_inputs(uris: Sequence[str], progress: Callable[[str, dict], None] | None = None, keep_bytes: bool = False,
                  lazy: bool = False, jpeg_space: str = "rgb") -> Decoded:
    """Read, hash and decode every input (the in-process loop: fits, evaluation, `lida attribute`, gallery chunks).

    Files that cannot be read or decoded become (uri, reason) errors. `lazy` keeps only the
    bytes (pixels become a LazyImages, decoded when read). `jpeg_space` is the model's (its
    fingerprint settings'). The Beam scan reads each file in its
    shard stage instead, where the bytes also go into the shard's tar.
    """
    from lida_core.inputs import read_input

    out = Decoded([], [], [], [], [])
    for n, uri in enumerate(uris, 1):
        try:
            data = read_input(uri)
            decoded = decode_image(data, uri, jpeg_space=jpeg_space)
        except DecodeError as exc:
            out.errors.append((uri, exc.reason))
        except OSError as exc:
            out.errors.append((uri, f"unreadable: {exc}"))
        else:
            out.uris.append(uri)
            out.image_ids.append(hashlib.sha256(data).hexdigest())
            if not lazy:
                out.pixels.append(decoded.pixels)
            out.jpeg.append(decoded.format in JPEG_FORMATS)
            out.quality.append(decoded.quality)
            out.dims.append((int(decoded.pixels.shape[0]), int(decoded.pixels.shape[1])))
            if keep_bytes or lazy:
                out.raw.append(data)
            del decoded
        if progress:
            progress("decode", {"done": n, "total": len(uris)})
    if lazy:
        out.pixels = LazyImages(out.raw, out.uris, jpeg_space)
    return out
