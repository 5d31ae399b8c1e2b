"""What the pipeline does to a query before the model sees it, whoever sent it.

Text: control characters (a pasted NUL, an escape sequence) and bidirectional formatting controls (U+202E
RIGHT-TO-LEFT OVERRIDE and kin, which make text display other than it reads) are removed, whitespace is
collapsed; right-to-left scripts themselves (Arabic, Hebrew) are kept and searched like any text. Lone
surrogates cannot reach the tokenizer. A query of any length is safe: the processor keeps its first
`max_caption_length` tokens.

Images: turned upright by their EXIF orientation (as `transformers.image_utils.load_image` does) and converted to
RGB from any mode (CMYK, 16-bit grey, palette with transparency: `image_processing.to_rgb`).
"""

from __future__ import annotations

import unicodedata

from .image_processing import to_rgb, upright

# bidirectional formatting controls: embeddings, overrides, isolates and marks
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def clean_text(text: str) -> tuple[str, int]:
    """`text` without control characters, bidirectional controls and lone surrogates (whitespace of any kind
    becomes one space), and how many characters were removed."""
    kept, removed = [], 0
    for char in text:
        if char.isspace():
            kept.append(" ")
        elif char in BIDI_CONTROLS or unicodedata.category(char) in ("Cc", "Cs"):
            removed += 1
        else:
            kept.append(char)
    return " ".join("".join(kept).split()), removed


def upright_rgb(image):
    """A PIL image as the model reads it: turned by its EXIF orientation, then RGB."""
    return to_rgb(upright(image))


__all__ = ["clean_text", "upright_rgb", "BIDI_CONTROLS"]
