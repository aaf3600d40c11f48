"""The one decoder: every documented mode, and refusals with a typed, named error."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import encode
from lida_core.decode import DecodeError, YCbCrPixels, _jpeg_pixels, decode_image, jpeg_quality, ycc_to_rgb
from lida_core.samples import sample_image


def test_rgb_png_round_trips_exactly(rng):
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    decoded = decode_image(encode(pixels), "a.png")
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(decoded.pixels, pixels)
    assert (decoded.format, decoded.mode, decoded.width, decoded.height) == ("PNG", "RGB", 53, 37)


def test_grey_is_copied_to_three_channels(rng):
    grey = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    pixels = decode_image(encode(Image.fromarray(grey, "L"))).pixels
    for c in range(3):
        np.testing.assert_array_equal(pixels[:, :, c], grey)


def test_alpha_is_dropped_not_composited(rng):
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    decoded = decode_image(encode(np.concatenate([rgb, alpha], 2)))
    np.testing.assert_array_equal(decoded.pixels, rgb)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha[:, :, 0])])
    np.testing.assert_array_equal(decode_image(encode(la)).pixels[:, :, 1], grey)


def test_palette_with_transparency_uses_palette_colours():
    palette_image = Image.new("P", (4, 3))
    palette = [0, 0, 0, 201, 13, 7, 9, 250, 33] + [0] * (256 * 3 - 9)
    palette_image.putpalette(palette)
    palette_image.putdata([0, 1, 2, 1] * 3)
    data = encode(palette_image, transparency=0)
    pixels = decode_image(data).pixels
    assert tuple(pixels[0, 1]) == (201, 13, 7)
    assert tuple(pixels[0, 2]) == (9, 250, 33)
    assert tuple(pixels[0, 0]) == (0, 0, 0)  # the transparent entry keeps its colour


def test_sixteen_bit_keeps_the_high_byte(rng):
    grey = rng.integers(0, 256, (6, 7)).astype(np.uint16)
    wide = Image.fromarray((grey * 257).astype(np.uint16))
    assert wide.mode.startswith("I")
    pixels = decode_image(encode(wide)).pixels
    np.testing.assert_array_equal(pixels[:, :, 0], grey)


def test_cmyk_uses_pillows_formula(rng):
    cmyk = Image.fromarray(rng.integers(0, 256, (5, 5, 4), dtype=np.uint8), "CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_image(data).pixels, expected)


def test_multi_frame_reads_the_first_frame():
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((250, 0, 0), (0, 250, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue())
    assert decoded.frames == 2
    assert decoded.pixels[0, 0, 0] > 200 and decoded.pixels[0, 0, 1] < 50


def test_exif_orientation_is_not_applied(rng):
    pixels = rng.integers(0, 256, (4, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" - must be ignored
    data = encode(pixels, "PNG", exif=exif.tobytes())
    assert decode_image(data).pixels.shape == (4, 10, 3)


def test_one_pixel_image():
    assert decode_image(encode(np.full((1, 1, 3), 7, np.uint8))).pixels.shape == (1, 1, 3)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"<html><body>not an image</body></html>", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image"),
    ],
)
def test_garbage_is_refused_with_a_reason(data, reason):
    with pytest.raises(DecodeError) as info:
        decode_image(data, "odd name é.jpg")
    assert reason in info.value.reason
    assert str(info.value).startswith("odd name é.jpg: ")


def test_pixel_data_shorter_than_the_header_says_is_refused():
    with pytest.raises(DecodeError, match="corrupt image"):
        decode_image(_png_header_only(4, 4), "short.png")


def test_truncated_file_is_refused(rng):
    data = encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG", quality=90)
    with pytest.raises(DecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2], "cut.jpg")


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(_png_header_only(100_000, 100_000), "bomb.png")
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(encode(np.zeros((20, 20, 3), np.uint8)), "small.png", max_pixels=399)


def test_float_images_are_refused():
    image = Image.fromarray(np.zeros((4, 4), np.float32), "F")
    with pytest.raises(DecodeError, match="mode F"):
        decode_image(encode(image, "TIFF"))


def _pillow_rgb(data: bytes) -> np.ndarray:
    """Pillow's own decode, the reference every JPEG's pixels must equal."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


# A real photograph's crop and a synthetic generator's output, at every setting Pillow writes.
_JPEG_SOURCES = {"real": lambda: sample_image("real", 3), "generated": lambda: sample_image("vae_ldm", 3)}


@pytest.mark.parametrize("source", sorted(_JPEG_SOURCES))
@pytest.mark.parametrize("quality", [50, 75, 90, 95, 100])
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize("progressive", [False, True])
def test_jpegs_decode_to_pillows_pixels_on_the_fast_path(source, quality, subsampling, progressive):
    pixels = _JPEG_SOURCES[source]()[:77, :101]  # odd sizes: partial blocks and chroma edges
    data = encode(pixels, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive,
                  optimize=progressive)
    with Image.open(io.BytesIO(data)) as image:
        fast = _jpeg_pixels(data, image)
    assert fast is not None, "simplejpeg did not decode a plain JPEG: the fast path is not in use"
    expected = _pillow_rgb(data)
    np.testing.assert_array_equal(fast, expected)
    decoded = decode_image(data, "x.jpg")
    np.testing.assert_array_equal(decoded.pixels, expected)
    assert decoded.pixels.flags["C_CONTIGUOUS"] and (decoded.format, decoded.mode) == ("JPEG", "RGB")


def test_grey_and_restart_marker_jpegs_decode_to_pillows_pixels():
    photo = sample_image("real", 5)
    grey = encode(Image.fromarray(photo[..., 1]), "JPEG", quality=90)
    restarts = encode(photo, "JPEG", quality=85, restart_marker_blocks=3)
    for data in (grey, restarts):
        with Image.open(io.BytesIO(data)) as image:
            assert _jpeg_pixels(data, image) is not None
        np.testing.assert_array_equal(decode_image(data).pixels, _pillow_rgb(data))


def test_a_jpeg_libjpeg_warns_about_is_left_to_pillow():
    # Two stray bytes before the scan: libjpeg warns ("extraneous bytes before marker"),
    # Pillow decodes it anyway, and so must lida, with Pillow's pixels.
    data = encode(sample_image("real", 7), "JPEG", quality=90)
    scan = data.index(b"\xff\xda")
    damaged = data[:scan] + b"\x12\x34" + data[scan:]
    with Image.open(io.BytesIO(damaged)) as image:
        assert _jpeg_pixels(damaged, image) is None
    np.testing.assert_array_equal(decode_image(damaged).pixels, _pillow_rgb(damaged))


@pytest.mark.parametrize("quality", [50, 90, 100])
@pytest.mark.parametrize("subsampling", [0, 1, 2])
@pytest.mark.parametrize("progressive", [False, True])
def test_jpegs_read_in_their_decoders_ycbcr_give_its_rgb_back_bit_for_bit(quality, subsampling, progressive):
    """`jpeg_space="ycc"`: the planes libjpeg converts, and `ycc_to_rgb` is that conversion exactly."""
    import simplejpeg

    pixels = _JPEG_SOURCES["generated"]()[:77, :101]
    data = encode(pixels, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive,
                  optimize=progressive)
    decoded = decode_image(data, "x.jpg", jpeg_space="ycc")
    assert isinstance(decoded.pixels, YCbCrPixels) and decoded.pixels.shape == (77, 101, 3)
    assert (decoded.format, decoded.mode, decoded.width, decoded.height) == ("JPEG", "RGB", 101, 77)
    # its luma is what libjpeg hands out for a grey read (no colour arithmetic at all)
    luma = simplejpeg.decode_jpeg(data, colorspace="GRAY", fastdct=False, fastupsample=False)[..., 0]
    np.testing.assert_array_equal(decoded.pixels[..., 0], luma)
    rgb = ycc_to_rgb(decoded.pixels)
    assert type(rgb) is np.ndarray
    np.testing.assert_array_equal(rgb, _pillow_rgb(data))
    assert not np.array_equal(np.asarray(decoded.pixels) & 7, rgb & 7)  # the low bits differ: the point of it


def test_only_colour_jpegs_are_read_in_ycbcr(rng):
    photo = sample_image("real", 5)
    others = {"png": encode(photo), "grey jpeg": encode(Image.fromarray(photo[..., 1]), "JPEG", quality=90),
              "cmyk jpeg": encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=90)}
    for what, data in others.items():
        pixels = decode_image(data, what, jpeg_space="ycc").pixels
        assert type(pixels) is np.ndarray, what
        np.testing.assert_array_equal(pixels, decode_image(data, what).pixels)
        assert ycc_to_rgb(pixels) is pixels  # RGB already
    cut = encode(photo, "JPEG", quality=90)
    with pytest.raises(DecodeError, match="truncated|corrupt"):
        decode_image(cut[: len(cut) // 2], "cut.jpg", jpeg_space="ycc")
    with pytest.raises(ValueError, match="jpeg_space"):
        decode_image(cut, "x.jpg", jpeg_space="yuv")


def test_copies_and_blurs_of_a_ycbcr_jpeg_start_from_its_rgb():
    from lida_core.perturb import Perturbation, jpeg_copy

    data = encode(sample_image("vae_ldm", 2), "JPEG", quality=85)
    ycc, rgb = decode_image(data, jpeg_space="ycc").pixels, decode_image(data).pixels
    np.testing.assert_array_equal(jpeg_copy(ycc, 75), jpeg_copy(rgb, 75))
    copy = jpeg_copy(rgb, 75, "ycc")  # read back as the model reads JPEGs
    assert isinstance(copy, YCbCrPixels)
    np.testing.assert_array_equal(ycc_to_rgb(copy), jpeg_copy(rgb, 75))
    np.testing.assert_array_equal(Perturbation("blur", 1.0).apply(ycc, "ycc"), Perturbation("blur", 1.0).apply(rgb))


def test_read_input_returns_every_byte_and_refuses_files_over_the_limit(tmp_path):
    from lida_core.inputs import InputReadError, read_input

    for size in (0, 1, 511, 4096, 100_003):
        path = tmp_path / f"{size}.bin"
        path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
        assert read_input(str(path)) == path.read_bytes()
        assert read_input(str(path), max_bytes=size) == path.read_bytes()  # at the limit is allowed
        if size:
            with pytest.raises(InputReadError, match="too large"):
                read_input(str(path), max_bytes=size - 1)
    # A regular file whose size stat does not know (procfs says 0): read to its end, still bounded.
    status = read_input("/proc/self/status")
    assert status.startswith(b"Name:") and len(status) > 100
    with pytest.raises(InputReadError, match="too large"):
        read_input("/proc/self/status", max_bytes=50)


def test_a_jpegs_quality_is_read_from_its_quantisation_tables(rng):
    """libjpeg's quality scaling, inverted: every quality Pillow writes, in colour (both subsamplings) and grey."""
    pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    for quality in range(1, 101):
        for image, options in ((pixels, {"subsampling": 0}), (pixels, {"subsampling": 2}), (pixels[..., 0], {})):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "JPEG", quality=quality, **options)
            assert decode_image(buffer.getvalue(), "q").quality == quality, (quality, options)
    assert decode_image(encode(pixels, "PNG"), "p").quality is None
    # Tables of the encoder's own (a camera's): the nearest quality; tables that are not 64 positive values: none.
    standard = Image.open(io.BytesIO(encode(pixels, "JPEG", quality=80))).quantization
    own = [[v + (i % 2) for i, v in enumerate(standard[t])] for t in (0, 1)]  # quality 80's, every other value one higher
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", qtables=own)
    assert Image.open(buffer).quantization[0] != standard[0] and 78 <= decode_image(buffer.getvalue(), "c").quality <= 80
    assert jpeg_quality({0: [0] * 64}) is None and jpeg_quality({0: [1] * 10}) is None and jpeg_quality({}) is None
