#!/usr/bin/env python3
"""Writes src/plot/font.rs: printable ASCII as a 7 x 13 bitmap, rendered from DejaVu Sans Mono
(Bitstream Vera / DejaVu licence: free to use, embed and redistribute) with Pillow.

Run by hand (../ref-venv/bin/python scripts/make_font.py); the output is committed so that
building ckpt needs no font on the machine.
"""
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

W, H = 7, 14
font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf", 11)
rows = []
for code in range(32, 127):
    img = Image.new("L", (W, H), 0)
    ImageDraw.Draw(img).text((0, -1), chr(code), fill=255, font=font)
    bits = []
    for y in range(H):
        v = 0
        for x in range(W):
            if img.getpixel((x, y)) >= 96:
                v |= 1 << x
        bits.append(v)
    rows.append(bits)
out = Path(__file__).resolve().parent.parent / "src/plot/font.rs"
with open(out, "w") as f:
    f.write("//! Printable ASCII (32..=126) as 7 x 13 bitmaps, one `u8` row each (bit x = column x),\n")
    f.write("//! rendered from DejaVu Sans Mono (Bitstream Vera / DejaVu licence) by scripts/make_font.py.\n\n")
    f.write(f"pub const WIDTH: usize = {W};\npub const HEIGHT: usize = {H};\n\n")
    f.write(f"pub const GLYPHS: [[u8; {H}]; 95] = [\n")
    for code, bits in zip(range(32, 127), rows):
        f.write("    [" + ", ".join(str(b) for b in bits) + f"], // {chr(code)!r}\n")
    f.write("];\n")
print("wrote", out)
