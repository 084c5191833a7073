"""Decode encoded image bytes to RGB uint8 arrays, fast where it can be and correct everywhere.

JPEGs without an EXIF rotation go through libjpeg-turbo (``simplejpeg``), optionally at a reduced DCT scale when
the image will be shrunk anyway; everything else (PNG, WebP, CMYK, 16-bit, palette, grayscale, RGBA, rotated
JPEGs) goes through PIL with EXIF orientation applied. A pixel cap refuses decompression bombs from the header,
before any pixel is decoded.
"""
from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # pragma: no cover - optional fast path
    simplejpeg = None

__all__ = ["DecodeError", "decode_image", "decode_mask", "probe_image", "exif_orientation", "to_rgb"]

Image.MAX_IMAGE_PIXELS = None  # our own cap (max_pixels) is checked from the header, before decoding


class DecodeError(ValueError):
    """The bytes are not a usable image; the message is the reason recorded for the skipped file."""


def exif_orientation(data: bytes) -> int:
    """EXIF orientation tag (1-8) of a JPEG, read from its APP1 segment without decoding; 1 when absent."""
    pos = 2
    n = len(data)
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
            break
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xE1 and data[pos + 4:pos + 10] == b"Exif\x00\x00":
            tiff = data[pos + 10:pos + 2 + length]
            if len(tiff) < 8:
                return 1
            endian = "<" if tiff[:2] == b"II" else ">"
            ifd = struct.unpack(endian + "I", tiff[4:8])[0]
            if ifd + 2 > len(tiff):
                return 1
            for i in range(struct.unpack(endian + "H", tiff[ifd:ifd + 2])[0]):
                entry = ifd + 2 + 12 * i
                if entry + 12 > len(tiff):
                    break
                tag, _typ, _count = struct.unpack(endian + "HHI", tiff[entry:entry + 8])
                if tag == 0x0112:
                    value = struct.unpack(endian + "H", tiff[entry + 8:entry + 10])[0]
                    return value if 1 <= value <= 8 else 1
            return 1
        pos += 2 + length
    return 1


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except Exception as err:  # noqa: BLE001 - any PIL failure is a bad file
        raise DecodeError(f"unreadable image header: {err}") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise DecodeError(f"too many pixels: {w}x{h} = {w * h:,} > cap {max_pixels:,} (decompression bomb?)")
    if w <= 0 or h <= 0:
        raise DecodeError(f"invalid size {w}x{h}")
    return img


def probe_image(data: bytes, max_pixels: int | None = None, full: bool = True) -> tuple[int, int, str]:
    """Check that ``data`` is a decodable image within the pixel cap; returns (width, height, format) after EXIF
    orientation. ``full`` decodes every pixel (catches truncation); otherwise only the header is read."""
    img = _open(data, max_pixels)
    fmt = img.format or "?"
    w, h = img.size
    if full:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
        except Exception as err:  # noqa: BLE001
            raise DecodeError(f"truncated or corrupt image data: {str(err)[:120]}") from None
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - broken EXIF is not fatal for the pixels
        orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return w, h, fmt


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: 16/32-bit integer and float scaled to 8 bits, palette and alpha flattened on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, max_pixels: int | None = None, min_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB. ``min_size`` (height, width): the decoder may return a smaller image than stored, but
    never smaller than this on either side (JPEG DCT scaling), since it will be resized to at least that anyway."""
    if simplejpeg is not None and data[:3] == b"\xff\xd8\xff" and exif_orientation(data) == 1:
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            if max_pixels is not None and w * h > max_pixels:
                raise DecodeError(f"too many pixels: {w}x{h} = {w * h:,} > cap {max_pixels:,} (decompression bomb?)")
            if colorspace in ("Gray", "YCbCr", "RGB"):
                kw = {"min_height": min_size[0], "min_width": min_size[1]} if min_size else {}
                return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, **kw)
        except DecodeError:
            raise
        except Exception:  # noqa: BLE001 - CMYK, truncated, odd markers: let PIL decide
            pass
    img = _open(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if min_size and img.format == "JPEG":
                img.draft("RGB", (min_size[1], min_size[0]))
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
            return np.asarray(rgb, dtype=np.uint8)
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DecodeError(f"truncated or corrupt image data: {str(err)[:120]}") from None


def decode_mask(data: bytes) -> np.ndarray:
    """(H, W) uint8 class ids from a PNG label mask (palette indices are ids, not colours)."""
    img = _open(data, None)
    try:
        if img.mode in ("P", "L"):
            return np.asarray(img, dtype=np.uint8)
        if img.mode in ("I;16", "I", "I;16B", "I;16L"):
            arr = np.asarray(img)
            if arr.max() > 255:
                raise DecodeError(f"mask has class ids above 255 (max {arr.max()})")
            return arr.astype(np.uint8)
        raise DecodeError(f"mask must be a single-channel (L or P) PNG, got mode {img.mode}")
    except DecodeError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DecodeError(f"corrupt mask: {str(err)[:120]}") from None
