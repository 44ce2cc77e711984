"""One labelled image per evaluation: a row of samples per prompt, the prompt written above it.

A single grid image is what a person opens in MLflow to compare trials, so each row carries its
prompt and every row has the same height whatever the prompt's length.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

LABEL_LINES = 2  # long prompts wrap onto this many lines, then are cut with "..."
PADDING = 4
BACKGROUND = "white"
TEXT_COLOR = "black"
ELLIPSIS = "..."  # ASCII: the bitmap fallback font has no "…" glyph

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def label_height(font: Font | None = None) -> int:
    """Height in pixels of the label strip above each row (fixed, so rows line up)."""
    font = font or ImageFont.load_default()
    return 2 * PADDING + LABEL_LINES * _line_height(font)


def image_grid(rows: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """Images in rows (one per prompt), each row under a strip holding its label, on white.

    Cells are as large as the largest image; a short row leaves its trailing cells white.
    """
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels: one label per row")
    if not rows or not any(rows):
        raise ValueError("image_grid needs at least one image")
    font = ImageFont.load_default()
    cell_w = max(image.width for row in rows for image in row)
    cell_h = max(image.height for row in rows for image in row)
    cols = max(len(row) for row in rows)
    strip = label_height(font)
    grid = Image.new("RGB", (cols * cell_w, len(rows) * (strip + cell_h)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    line_h = _line_height(font)
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        top = r * (strip + cell_h)
        for i, line in enumerate(wrap_label(label, grid.width - 2 * PADDING, font)):
            draw.text((PADDING, top + PADDING + i * line_h), line, fill=TEXT_COLOR, font=font)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB"), (c * cell_w, top + strip))
    return grid


def wrap_label(text: str, max_width: float, font: Font, max_lines: int = LABEL_LINES) -> list[str]:
    """Greedy word wrap to ``max_width`` pixels; what does not fit in ``max_lines`` ends in "..."."""
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= max_width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:  # the rest would need more lines: it goes on the last one, which is then cut
        lines[-1] = f"{lines[-1]} {' '.join(words)}"
    # A single word wider than the strip is cut too.
    return [line if font.getlength(line) <= max_width else _cut(line, max_width, font) for line in lines]


def _cut(text: str, max_width: float, font: Font) -> str:
    """The longest prefix of ``text`` that fits in ``max_width`` with "..." appended."""
    for end in range(len(text), -1, -1):
        candidate = text[:end].rstrip() + ELLIPSIS
        if font.getlength(candidate) <= max_width:
            return candidate
    return ""


def _line_height(font: Font) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return ascent + descent
    return font.getbbox("Ag")[3] + 2
