"""Find image files and decode them safely into uint8 RGB arrays of the model's input size.

A model takes one square size, or a few fixed shapes (aspect buckets): each image is resized to
the shape whose aspect ratio is nearest its own, so batches of one shape need no padding.

Every failure becomes an ImageError whose message is a one-line reason (and whose `transient`
flag says whether retrying the unchanged file may help); nothing here ever takes a batch down.
Decoding reads the file once, hashes those bytes (for duplicate detection and catalogs) and
decodes from memory.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn, TypeAlias

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ImageError, PipelineError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's decompression-bomb threshold
DEFAULT_DECODE_TIMEOUT = 30.0  # seconds

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image

Shape = tuple[int, int]  # height, width


@dataclass(frozen=True)
class TrimFrame:
    """The input size of a model whose images lose a uniform frame before the resize (trim_frame)."""

    size: int | tuple[Shape, ...]


# A square side, the fixed shapes of an aspect-kept model, or either framed.
InputSize: TypeAlias = int | tuple[Shape, ...] | TrimFrame

FRAME_STD = 4.0  # a frame line's grey levels vary by at most this (standard deviation; JPEG noise stays under it)
FRAME_TONE = 8.0  # ... and its mean is within this of its side's edge colour, and of the opposite side's


def input_shapes(size: InputSize) -> tuple[Shape, ...]:
    """Every shape a model of this input size takes."""
    size = size.size if isinstance(size, TrimFrame) else size
    return ((size, size),) if isinstance(size, int) else size


def frame_margins(grey: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) lines of a uniform frame around a grey image: a letterbox, a pillarbox or a
    mat. A side's margin is its run of uniform lines of the edge's colour (FRAME_STD, FRAME_TONE), at least
    1% of the side; a pair of opposite sides is trimmed only when BOTH have a margin, of about one width
    (within a factor 2) and one colour, and half the picture stays. One-sided runs are left alone: a clear
    sky or a white caption band is part of the picture, a frame surrounds it."""
    edge_uniform = [line.std() <= FRAME_STD for line in (grey[0], grey[-1], grey[:, 0], grey[:, -1])]
    if not (edge_uniform[0] and edge_uniform[1]) and not (edge_uniform[2] and edge_uniform[3]):
        return 0, 0, 0, 0  # most pictures: no opposite pair of edges is uniform, so no frame (and no more work)
    runs, edges = [], []
    for lines in (grey, grey[::-1], grey.T, grey.T[::-1]):
        edge = float(np.median(lines[0]))
        uniform = (lines.std(1) <= FRAME_STD) & (np.abs(lines.mean(1) - edge) <= FRAME_TONE)
        run = len(lines) if uniform.all() else int(np.argmin(uniform))
        runs.append(run if run >= 0.01 * len(lines) else 0)
        edges.append(edge)
    out = []
    for (a, b), (ea, eb), length in (
        ((runs[0], runs[1]), (edges[0], edges[1]), grey.shape[0]),
        ((runs[2], runs[3]), (edges[2], edges[3]), grey.shape[1]),
    ):
        framed = min(a, b) >= 0.5 * max(a, b) > 0 and abs(ea - eb) <= FRAME_TONE and length - a - b >= 0.5 * length
        out += [a, b] if framed else [0, 0]
    return out[0], out[1], out[2], out[3]


def trim_frame(im: Image.Image) -> Image.Image:
    """The picture inside a uniform frame (frame_margins), or `im` itself: a framed or letterboxed copy then
    looks like its original to the model, which sees the frame otherwise as a large part of the picture."""
    top, bottom, left, right = frame_margins(np.asarray(im.convert("L"), dtype=np.float32))
    if not (top or bottom or left or right):
        return im
    return im.crop((left, top, im.width - right, im.height - bottom))


def nearest_shape(size: InputSize, width: int, height: int) -> Shape:
    """The input shape for a width x height picture: the square, or the shape whose aspect ratio
    is nearest (in log ratio) the picture's."""
    aspect = np.log(width / height)
    return min(input_shapes(size), key=lambda s: abs(np.log(s[1] / s[0]) - aspect))


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(roots: Iterable[Path | str], unreadable: list[tuple[str, str]] | None = None) -> list[Path]:
    """Absolute paths of image files under each root, sorted and without repeats: iter_images() as a
    list, for the few callers whose file lists are small (queries, calibration images)."""
    return sorted(set(iter_images(roots, unreadable)))


def iter_images(
    roots: Iterable[Path | str], unreadable: list[tuple[str, str]] | None = None, skip: Sequence[Path] = ()
) -> Iterator[Path]:
    """Absolute paths of image files under each root (recursive, extensions case-insensitive), yielded
    folder by folder, in sorted order within each folder: memory holds one folder's names, never the
    whole tree. A file under two overlapping roots is yielded twice.

    A root may also be a single image file. Symlinked files are listed (a broken one fails at
    decode time with its reason); symlinked folders are not followed, so cycles cannot occur.
    Folders (roots included) that cannot be listed (permissions, I/O errors, a stale mount) are
    appended to `unreadable` as (absolute path, reason): what they hold is unknown, not absent.
    Without `unreadable` they are skipped. A root that does not exist raises PipelineError at once,
    before anything is yielded. Folders in `skip` (absolute) are not entered.
    """
    paths = [Path(r) for r in roots]
    for root in paths:
        try:
            if not root.exists():
                raise PipelineError(f"folder not found: {root}")
        except OSError:  # e.g. ESTALE, EIO: the walk reports it as a folder it cannot list
            pass
    return _walk(paths, unreadable, {str(f) for f in skip})


def _walk(roots: list[Path], unreadable: list[tuple[str, str]] | None, skip: set[str]) -> Iterator[Path]:
    def cannot_list(exc: OSError) -> None:
        if unreadable is not None:
            unreadable.append((str(Path(exc.filename).absolute()), exc.strerror or str(exc)))

    for root in roots:
        try:
            if root.is_file():
                yield root.absolute()
                continue
            is_dir = root.is_dir()
        except OSError as exc:  # e.g. ESTALE, EIO (is_dir() swallows only "does not exist")
            cannot_list(exc)
            continue
        if not is_dir:  # removed since iter_images() looked
            raise PipelineError(f"folder not found: {root}")
        for dirpath, dirnames, filenames in os.walk(root, onerror=cannot_list):
            base = Path(dirpath).absolute()
            if str(base) in skip:
                dirnames.clear()
                continue
            dirnames.sort()
            yield from (base / f for f in sorted(filenames) if is_image_name(f))


@dataclass(frozen=True)
class Decoded:
    """One decoded image: pixels at the model's input size, and the facts of its file."""

    pixels: np.ndarray  # uint8 [height, width, 3], RGB, of one of the model's input shapes
    content_hash: str  # blake2b-128 of the file bytes
    size: int  # bytes
    mtime: float
    width: int = 0  # the picture's own size, upright (EXIF orientation applied); 0: unknown
    height: int = 0


class _Timeout(BaseException):  # BaseException: no library "except Exception" swallows it
    pass


def _on_alarm(signum: int, frame: FrameType | None) -> NoReturn:  # pragma: no cover - runs inside the signal
    raise _Timeout()


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited over white, 16-bit scaled, CMYK/palette converted."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)  # one float32 working copy, scaled in place (float64: twice that)
        if im.mode != "F" and arr.max(initial=0) > 255:  # 16-bit data: keep the full range
            arr /= 257.0
        arr += 0.5
        np.clip(arr, 0, 255, out=arr)
        im = Image.fromarray(arr.astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


# Bytes a pixel of each mode takes once decoded (Pillow); modes not listed: 4.
MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3}
MODE_BYTES |= dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N"), 2)


def decode_cost(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """An upper bound of the memory decoding `data` takes, from its header alone (nothing is decoded): the
    decoded pixels, an upright copy (EXIF), a float32 working copy for high-bit modes and the RGB result.
    A 16-bit 9000 x 9000 PNG of 200 KB costs 0.9 GB: the budget is counted in these bytes, not in uploads."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                pixels, mode = im.width * im.height, im.mode
    except UnidentifiedImageError:
        raise ImageError("not an image (Pillow cannot identify the format)") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if pixels > max_pixels:
        raise ImageError(
            f"image too large: {pixels} pixels exceeds the limit of {max_pixels} (possible decompression bomb)"
        )
    per_pixel = 2 * MODE_BYTES.get(mode, 4) + 3 + (4 if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") else 0)
    return pixels * per_pixel


def decode_bytes(data: bytes, size: InputSize, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 RGB [height, width, 3] (see nearest_shape) from encoded image bytes; raises ImageError with a reason."""
    im = decode_rgb(data, size, max_pixels)
    if isinstance(size, TrimFrame):
        im = trim_frame(im)
    height, width = nearest_shape(size, im.width, im.height)
    return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def _draft_size(im: Image.Image, size: InputSize) -> tuple[int, int]:
    """(width, height), in the file's orientation, that a JPEG's reduced decode must keep: its input shape."""
    turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # upright = width and height swapped
    height, width = nearest_shape(size, *((im.height, im.width) if turned else (im.width, im.height)))
    return (height, width) if turned else (width, height)


def decode_rgb(data: bytes, draft: InputSize | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A loaded RGB image, upright (EXIF orientation applied), from encoded bytes; raises ImageError.

    `draft`: JPEGs may be decoded at 1/2, 1/4 or 1/8 scale as long as both sides stay >= the input
    shape the picture will be resized to (see nearest_shape).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    raise ImageError(
                        f"image too large: {im.width}x{im.height} pixels exceeds the limit of {max_pixels} "
                        "(possible decompression bomb)"
                    )
                if im.format == "JPEG" and draft:
                    im.draft(im.mode, _draft_size(im, draft))
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (Pillow cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"image too large: over {min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)} pixels "
            "(possible decompression bomb)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated" in msg:
            raise ImageError(f"truncated image ({msg})") from None
        raise ImageError(f"corrupt image ({msg})") from None
    except MemoryError:
        raise ImageError("out of memory while decoding", transient=True) from None


def read_file(path: Path) -> tuple[bytes, os.stat_result]:
    """The bytes and stat of a file, with one-line reasons for the usual failures."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file")
        with open(path, "rb") as f:
            return f.read(), st
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError("broken symbolic link", transient=True) from None
        raise ImageError("file not found (deleted during the run?)", transient=True) from None
    except PermissionError:
        raise ImageError("permission denied", transient=True) from None
    except IsADirectoryError:
        raise ImageError("is a directory") from None
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror or exc})", transient=True) from None


def read_regular_file(path: Path | str, max_bytes: int, within: Sequence[str] | None = None) -> bytes:
    """The bytes of `path` for a reader that must not be led astray (the service's thumbnails): a symbolic
    link as its last part is not followed, anything but a regular file (a FIFO, a device) is refused without
    blocking on it, and a file over `max_bytes` is refused unread. With `within` (folders), the file opened
    must resolve inside one of them: a link or a moved folder higher up the path cannot lead out of the
    collection (the check is of the file actually opened, so a swap after it cannot either). ImageError
    with the reason otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError("file not found", transient=True) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError("a symbolic link (not followed here)") from None
        raise ImageError(f"cannot read file ({exc.strerror or exc})", transient=True) from None
    try:
        if within is not None and not is_inside(_opened_path(fd, path), within):
            raise ImageError("outside the collection's folders (reached through a link)")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file")
        if st.st_size > max_bytes:
            raise ImageError(f"{st.st_size} bytes, over the {max_bytes} read here")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read file ({exc.strerror or exc})", transient=True) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew while read
        raise ImageError(f"over the {max_bytes} bytes read here")
    return data


def _opened_path(fd: int, path: Path | str) -> str:
    """Where an open file really is: Linux says it in /proc; elsewhere the path resolved now."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def is_inside(path: str, folders: Sequence[str]) -> bool:
    """Whether the resolved `path` is one of `folders` (resolved) or below one."""
    for folder in folders:
        real = os.path.realpath(folder)
        if path == real or path.startswith(real.rstrip(os.sep) + os.sep):
            return True
    return False


def content_hash(data: bytes) -> str:
    """The content hash of a file's bytes (blake2b-128, hex): what tells byte-identical files everywhere (the
    catalog, the id table, the journal of additions, a query's own copies)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def load_image(
    path: Path | str,
    size: InputSize,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float | None = None,
) -> Decoded:
    """Read, hash and decode one image file. `timeout` (seconds) uses SIGALRM: main thread only."""
    path = Path(path)
    if timeout:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        data, st = read_file(path)
        digest = content_hash(data)
        pixels = decode_bytes(data, size, max_pixels)
        width, height = upright_size(data)
    except _Timeout:
        raise ImageError(f"reading and decoding took longer than {timeout:g} s; skipped", transient=True) from None
    finally:
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return Decoded(pixels, digest, st.st_size, st.st_mtime, width, height)


def upright_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image as people see it (EXIF orientation applied), from its header alone; the
    built-in `width` and `height` fields of search filters. (0, 0) when the header cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
            return (im.height, im.width) if turned else (im.width, im.height)
    except Exception:  # decoding succeeded, so this is only a header quirk: the size stays unknown
        return 0, 0


_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


def image_suffix(data: bytes) -> str:
    """The file name suffix of encoded image bytes, from their header (what a stored upload is named by, never
    the name a client sent); ImageError for bytes of no format the collection takes."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
    except Exception as exc:  # Pillow raises many kinds for bytes that are not an image
        raise ImageError(f"not an image ({type(exc).__name__})") from None
    if fmt not in _SUFFIXES:
        raise ImageError(f"{fmt or 'this'} images are not taken (JPEG, PNG, WebP, BMP, GIF or TIFF)")
    return _SUFFIXES[fmt]
