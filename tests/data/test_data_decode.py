"""Every Pillow mode becomes correctly scaled 8-bit RGB, or is left out with the reason.

The files are written by the tests in real formats (PNG, TIFF, JPEG); pixel values are asserted after the
decoding that discovery, ``data inspect --verify`` and the latent cache share.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kubetuner_trainer.data.buckets import SamplePlan
from kubetuner_trainer.data.decode import UnreadableImage, decode_rgb, to_rgb8
from kubetuner_trainer.data.images import pixels_from_bytes
from kubetuner_trainer.data.metadata import probe_bytes


def _save(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _grey16(value: int) -> np.ndarray:
    return np.full((8, 8), value, dtype=np.uint16)


def test_16_bit_grey_png_is_scaled_not_clamped():
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    data = _save(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = np.asarray(decode_rgb(data))
    assert got.shape == (8, 8, 3)
    assert (got[..., 0] == np.rint(values / 257)).all() and (got[..., 0] == got[..., 2]).all()
    assert (got == 255).mean() < 0.05  # Pillow's convert("RGB") made nearly all of it white


@pytest.mark.parametrize(("mode", "dtype"), [("I;16B", ">u2"), ("I;16L", "<u2")])
def test_16_bit_byte_orders(mode, dtype):
    image = Image.frombytes(mode, (8, 8), _grey16(0x8080).astype(dtype).tobytes())
    assert image.mode == mode and (np.asarray(to_rgb8(image)) == 128).all()
    # and through a file: 16-bit TIFFs of either byte order
    assert (np.asarray(decode_rgb(_save(image, "TIFF"))) == 128).all()


def test_32_bit_integer_within_16_bits_is_scaled_and_beyond_is_left_out():
    inside = Image.fromarray(np.full((8, 8), 0xFFFF, dtype=np.int32), "I")
    assert (np.asarray(decode_rgb(_save(inside, "TIFF"))) == 255).all()
    beyond = Image.fromarray(np.full((8, 8), 1 << 20, dtype=np.int32), "I")
    with pytest.raises(UnreadableImage, match="beyond 16 bits"):
        decode_rgb(_save(beyond, "TIFF"))


def test_float_pixels_in_unit_range_are_scaled_and_others_left_out():
    half = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F")
    assert (np.asarray(decode_rgb(_save(half, "TIFF"))) == 128).all()
    hdr = Image.fromarray(np.full((8, 8), 7.5, dtype=np.float32), "F")
    with pytest.raises(UnreadableImage, match=r"outside 0.0..1.0"):
        decode_rgb(_save(hdr, "TIFF"))


def test_16_bit_rgb_png_keeps_its_colours():
    pixels = np.zeros((4, 4, 3), dtype=np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 0xFFFF, 0x8080, 0x0101
    got = np.asarray(decode_rgb(_png16_rgb(pixels)))
    assert got.shape == (4, 4, 3) and tuple(got[0, 0]) == (255, 128, 1)


def test_transparency_is_composited_over_white():
    la = Image.new("LA", (4, 4), (0, 0))  # black, fully transparent
    la.putpixel((0, 0), (10, 255))
    got = np.asarray(decode_rgb(_save(la)))
    assert tuple(got[1, 1]) == (255, 255, 255) and tuple(got[0, 0]) == (10, 10, 10)

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    palette.putpixel((0, 0), 1)
    got = np.asarray(decode_rgb(_save(palette, transparency=0)))
    assert tuple(got[1, 1]) == (255, 255, 255) and tuple(got[0, 0]) == (200, 30, 40)

    pa = Image.new("PA", (4, 4), (1, 128))  # palette colour 1 at half opacity
    pa.putpalette([0, 0, 0, 0, 0, 200] + [0] * 762)
    got = np.asarray(decode_rgb(_save(pa.convert("RGBA"))))  # PNG stores PA as RGBA
    assert tuple(got[0, 0]) == (127, 127, 227)
    assert tuple(np.asarray(to_rgb8(pa))[0, 0]) == (127, 127, 227)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    got = np.asarray(decode_rgb(_save(cmyk, "JPEG", quality=100)))
    r, g, b = (int(v) for v in got[4, 4])
    assert r > 240 and g < 15 and b < 15


def test_lab_is_left_out_by_discovery_with_the_reason():
    data = _save(Image.new("LAB", (8, 8)), "TIFF")
    with pytest.raises(UnreadableImage, match="CIELAB"):
        probe_bytes(data)


def test_training_pixels_of_a_16_bit_png_match_its_values():
    data = _save(Image.fromarray(_grey16(0x4040)))  # 16448 / 257 = 64
    plan = SamplePlan(key="g.png", version="1", original_size=(8, 8), intermediate_size=(8, 8), target_size=(8, 8),
                      crop_left=0, crop_top=0)
    pixels = pixels_from_bytes(data, plan)
    assert pixels.shape == (3, 8, 8)
    assert torch_close(pixels, 64 / 127.5 - 1.0)


def torch_close(tensor, value: float) -> bool:
    return bool(((tensor - value).abs() < 1e-6).all())
