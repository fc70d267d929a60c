"""Contact sheets (Pillow only): search results (one row per query, its top-k beside it) and
near-duplicate groups (one PNG per group).

Each tile shows the picture (fitted, aspect kept) with rank, score and file name under it.
A result file that cannot be read gets a grey placeholder tile, never an error.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from PIL import Image, ImageDraw, ImageFont

from .duplicates import DuplicateGroup
from .errors import ImageError
from .fsutil import atomic_write_bytes
from .images import decode_rgb, read_file
from .search import QueryResult

Font: TypeAlias = ImageFont.ImageFont | ImageFont.FreeTypeFont  # what ImageFont.load_default() returns
PAD = 8
CAPTION = 30  # two lines of the default font
BACKGROUND = (255, 255, 255)
PLACEHOLDER = (200, 200, 200)


def sheet_size(n_queries: int, k: int, thumb: int = 160) -> tuple[int, int]:
    """Pixel size of a sheet of n_queries rows of 1 + k tiles."""
    return PAD + (k + 1) * (thumb + PAD), PAD + n_queries * (thumb + CAPTION + PAD)


def thumbnail(path: str, thumb: int) -> Image.Image | None:
    """The picture at `path` fitted in thumb x thumb (aspect kept), None when it cannot be read."""
    try:
        return thumbnail_of(read_file(Path(path))[0], thumb)
    except ImageError:
        return None


def thumbnail_of(data: bytes, thumb: int) -> Image.Image:
    """The picture encoded in `data` fitted in thumb x thumb (aspect kept); ImageError when it is not one."""
    im = decode_rgb(data, draft=thumb)
    im.thumbnail((thumb, thumb))
    return im


def _fit(text: str, font: Font, width: int, draw: ImageDraw.ImageDraw) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def contact_sheet(results: Sequence[QueryResult], out: Path | str, k: int, thumb: int = 160) -> tuple[int, int]:
    """Write a PNG contact sheet of `results` (k result columns) to `out`; returns its size."""
    size = sheet_size(len(results), k, thumb)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, result in enumerate(results):
        y = PAD + row * (thumb + CAPTION + PAD)
        cells = [(result.query, "query")] + [(h.path, f"#{h.rank}  {h.score:.3f}") for h in result.hits[:k]]
        for col, (path, label) in enumerate(cells):
            _draw_cell(sheet, draw, font, PAD + col * (thumb + PAD), y, path, label, thumb, framed=col == 0)
    _save(sheet, Path(out))
    return size


def group_sheets(
    groups: Sequence[DuplicateGroup], out_dir: Path | str, columns: int = 6, thumb: int = 160
) -> list[Path]:
    """One PNG per near-duplicate group in `out_dir` (group-0001.png is the largest group): its images in
    rows of `columns`, the best-quality copy first and framed, each with its cosine to it and its size."""
    out_dir = Path(out_dir)
    written = []
    for group in groups:
        cols = min(columns, len(group.images))
        rows = -(-len(group.images) // cols)
        sheet = Image.new("RGB", (PAD + cols * (thumb + PAD), PAD + rows * (thumb + CAPTION + PAD)), BACKGROUND)
        draw = ImageDraw.Draw(sheet)
        font = ImageFont.load_default()
        for n, im in enumerate(group.images):
            size = f"{im.width}x{im.height}" if im.width else "?"
            label = f"{'best' if n == 0 else f'{im.score_to_first:.3f}'}  {size}"
            _draw_cell(
                sheet,
                draw,
                font,
                PAD + n % cols * (thumb + PAD),
                PAD + n // cols * (thumb + CAPTION + PAD),
                im.path,
                label,
                thumb,
                framed=n == 0,
            )
        written.append(out_dir / f"group-{group.group:04d}.png")
        _save(sheet, written[-1])
    return written


def _draw_cell(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    font: Font,
    x: int,
    y: int,
    path: str,
    label: str,
    thumb: int,
    framed: bool,
) -> None:
    """One tile at (x, y): the picture (or a grey placeholder), a label and the file name under it."""
    im = thumbnail(path, thumb)
    if im is None:
        draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=PLACEHOLDER)
        draw.text((x + 6, y + thumb // 2 - 6), "unreadable", fill=(90, 90, 90), font=font)
    else:
        sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
    if framed:
        draw.rectangle((x - 3, y - 3, x + thumb + 2, y + thumb + 2), outline=(220, 40, 40), width=2)
    draw.text((x, y + thumb + 3), _fit(label, font, thumb, draw), fill=(0, 0, 0), font=font)
    draw.text((x, y + thumb + 16), _fit(Path(path).name, font, thumb, draw), fill=(70, 70, 70), font=font)


def _save(sheet: Image.Image, out: Path) -> None:
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    atomic_write_bytes(out, buf.getvalue())
