"""Safe decoding: every broken input becomes a DecodeError, every odd mode becomes the right RGB pixels."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from retrieval.data import decode
from retrieval.data.decode import DEFAULT_MAX_PIXELS, DecodedImage, decode_image, load_image
from retrieval.errors import DecodeError

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise_jpeg(w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(0)
    return _encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "JPEG", quality=90)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR claiming width x height RGB, and IEND: no pixel data at all."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _close(pixel, expected, tol=6) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def test_truncated_images_are_not_loaded_silently():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for data in (_noise_jpeg()[:900], _encode(Image.new("RGB", (64, 64), RED), "PNG")[:60]):
        with pytest.raises(DecodeError) as info:
            decode_image(data, name="cut.jpg")
        assert info.value.path == Path("cut.jpg")
        assert "truncated" in info.value.reason


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty") as info:
        load_image(path)
    assert info.value.path == path


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    with pytest.raises(DecodeError, match="not a recognised image") as info:
        load_image(path)
    assert info.value.path == path


def test_missing_file_and_directory(tmp_path):
    for path in (tmp_path / "absent.jpg", tmp_path):
        with pytest.raises(DecodeError, match="cannot read"):
            load_image(path)


def test_png_alpha_is_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    img.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent blue -> white
    img.putpixel((2, 0), (255, 0, 0, 128))  # half red over white
    out = decode_image(_encode(img, "PNG"), name="a.png").image
    assert out.mode == "RGB"
    half = round(255 * (1 - 128 / 255))
    assert [out.getpixel((x, 0)) for x in range(3)] == [RED, WHITE, (255, half, half)]


def test_palette_gif_with_transparency():
    img = Image.new("P", (3, 1))
    img.putpalette([*RED, *GREEN, *BLUE] + [0] * (256 - 3) * 3)
    img.putdata([0, 1, 2])
    data = _encode(img, "GIF", transparency=2)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, name="p.gif").image
    assert [out.getpixel((x, 0)) for x in range(3)] == [RED, GREEN, WHITE]


def test_cmyk_jpeg():
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, name="c.jpg").image
    assert out.mode == "RGB" and _close(out.getpixel((8, 8)), RED)


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert data[24] == 16  # IHDR bit depth: a real 16-bit PNG
    out = decode_image(data, name="d.png").image
    expected = np.rint(values / 257.0).astype(np.uint8)[0]  # 0, 128, 255, 4
    assert [out.getpixel((x, 0)) for x in range(4)] == [(int(v),) * 3 for v in expected]


@pytest.mark.parametrize("mode", ["L", "1", "LA", "P"])
def test_greyscale_modes_become_rgb(mode):
    img = Image.new("L", (4, 4), 255).convert(mode)
    out = decode_image(_encode(img, "PNG"), name="g.png").image
    assert out.mode == "RGB" and out.getpixel((1, 1)) == WHITE


@pytest.mark.parametrize("orientation, quarter_turns", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(orientation, quarter_turns):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # stored landscape: red left half, blue right half
    pixels[:, :20] = RED
    pixels[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())
    expected = np.rot90(pixels, quarter_turns)  # the viewer's picture, rotated by numpy independently
    decoded = decode_image(data, name="r.jpg")
    assert decoded.image.size == (expected.shape[1], expected.shape[0])
    assert (decoded.width, decoded.height) == decoded.image.size
    for fy, fx in [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)]:
        y, x = int(fy * expected.shape[0]), int(fx * expected.shape[1])
        assert _close(decoded.image.getpixel((x, y)), expected[y, x], tol=40)


def test_pixel_cap_small():
    data = _encode(Image.new("RGB", (100, 60), RED), "PNG")
    with pytest.raises(DecodeError, match=r"100x60 = 6,000.*max_pixels=5,000"):
        decode_image(data, name="big.png", max_pixels=5_000)
    assert decode_image(data, name="big.png", max_pixels=6_000).image.size == (100, 60)


@pytest.mark.parametrize("side", [10_000, 50_000])  # 1e8 (Pillow only warns) and 2.5e9 (Pillow refuses)
def test_header_only_bomb_rejected_before_decoding(side):
    data = _png_header_only(side, side)
    assert len(data) < 100 and side * side > DEFAULT_MAX_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DecodeError, match="too many pixels.*max_pixels=") as info:
            decode_image(data, name="bomb.png")
    assert "truncated" not in info.value.reason  # refused from the header, no pixel was read


def _gradient_jpeg(w: int, h: int) -> bytes:
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return _encode(Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8)), "JPEG", quality=90)


@pytest.mark.parametrize("draft_size", [40, 75, 76, 100, 150, 151, 300, 599, 600, 900])
def test_draft_keeps_shorter_side_at_least_draft_size(draft_size):
    decoded = decode_image(_gradient_jpeg(800, 600), name="big.jpg", draft_size=draft_size)
    short = min(decoded.image.size)
    assert (decoded.width, decoded.height) == (800, 600)
    assert decoded.image.width / decoded.image.height == pytest.approx(800 / 600, rel=0.02)
    if draft_size >= 600:
        assert short == 600
    else:
        assert short >= draft_size
        assert short < 2 * draft_size or short == 600 // 8 + (600 % 8 > 0)  # as small as JPEG scales allow


def test_bbox_crop_with_draft():
    pixels = np.full((600, 800, 3), 255, dtype=np.uint8)
    pixels[100:400, 400:600] = GREEN  # bbox x=400 y=100 w=200 h=300
    data = _encode(Image.fromarray(pixels), "JPEG", quality=95)
    full = decode_image(data, name="b.jpg", bbox=(400, 100, 200, 300))
    assert full.image.size == (200, 300)
    small = decode_image(data, name="b.jpg", bbox=(400, 100, 200, 300), draft_size=50)
    assert min(small.image.size) >= 50 and small.image.size[0] < 200
    for out in (full, small):
        mean = np.asarray(out.image, dtype=np.float64).reshape(-1, 3).mean(0)
        assert _close(mean, GREEN, tol=12)
    with pytest.raises(DecodeError, match="outside"):
        decode_image(data, name="b.jpg", bbox=(900, 0, 10, 10))


def test_plain_jpeg_round_trip():
    decoded = decode_image(_noise_jpeg(), name="ok.jpg")
    assert isinstance(decoded, DecodedImage) and decoded.image.mode == "RGB"
    assert decoded.image.size == (decoded.width, decoded.height) == (64, 48)


@pytest.mark.parametrize("cpus, device, minimum, expected", [
    (2, "cpu", 0, 0), (2, "cpu", 1, 1), (16, "cpu", 0, 4), (2, "cuda", 0, 2), (32, "cuda:1", 0, 8), (None, "cpu", 1, 1),
])
def test_default_workers_leave_the_cpu_to_the_model_and_feed_a_gpu(monkeypatch, cpus, device, minimum, expected):
    monkeypatch.setattr(decode.os, "cpu_count", lambda: cpus)
    assert decode.default_workers(device, minimum=minimum) == expected


def test_decoding_leaves_pillows_process_wide_cap_alone_and_says_when_it_refuses_first(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow refuses above 2x its cap: 2,000 here
    data = _encode(Image.new("RGB", (100, 60), RED), "PNG")  # 6,000 pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    with pytest.raises(DecodeError, match="MAX_IMAGE_PIXELS refused it first"):
        decode_image(data, name="big.png", max_pixels=10_000)
    assert Image.MAX_IMAGE_PIXELS == 1_000   # a library call changed nothing process-wide


def test_allow_pixels_raises_pillows_cap_for_an_entry_point_and_never_lowers_it(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    data = _encode(Image.new("RGB", (100, 60), RED), "PNG")  # 6,000 pixels
    decode.allow_pixels(10_000)
    assert Image.MAX_IMAGE_PIXELS == 10_000
    assert decode_image(data, name="big.png", max_pixels=10_000).image.size == (100, 60)
    with pytest.raises(DecodeError, match="max_pixels=5,000"):
        decode_image(data, name="big.png", max_pixels=5_000)
    decode.allow_pixels(2_000)
    assert Image.MAX_IMAGE_PIXELS == 10_000
