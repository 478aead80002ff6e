"What an experiment wrote, checked the same way wherever it was run: PNGs that decode, tables in `write_table`'s layout."
import re
from pathlib import Path

import pandas as pd


def check_png(path: Path):
    "A PNG that decodes, of a figure's size, with something drawn on it (more than one colour)."
    from PIL import Image
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 300 and im.height >= 200, (path.name, im.format, im.size)
        im.load()
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 24)) > 2, (path.name, "a blank image")


def check_table(md: Path):
    "`write_table`'s layout: a title, the preset note first, one markdown table holding the CSV's columns and rows."
    lines = md.read_text().splitlines()
    assert lines[0].startswith("### ") and len(lines[0]) > 4, (md.name, lines[0])
    notes = [l for l in lines if l.startswith("- ")]
    assert notes and notes[0].startswith("- preset: smoke"), (md.name, notes[:1])
    rows = [l for l in lines if l.startswith("|")]
    header = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", rows[0].strip("|"))]   # a "|" in a name is "\|"
    df = pd.read_csv(md.with_suffix(".csv"), dtype=str)
    assert header == list(df.columns) and len(rows) - 2 == len(df) > 0, (md.name, header, list(df.columns), len(rows) - 2, len(df))
