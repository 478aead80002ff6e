"""The house's reading rules, per notebook: exported lines (a notebook exports at most ~450), export cells over 40
lines (unless the cell is one class), and exported definitions not followed by a check that could fail (the next
code cell after an export cell must assert something: `assert`, fastcore's `test_*`, `pytest.raises` or
`ExceptionExpected`, at the start of a line).

    .venv/bin/python scripts/notebook_lint.py [nbs/NN_name.ipynb ...]     # default: every numbered notebook
"""
import ast, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_EXPORT_LINES, MAX_CELL_LINES = 450, 40
CHECK = re.compile(r"^\s*(assert\b|test_\w+\(|with\s+(pytest\.raises|ExceptionExpected))", re.M)


def _src(c) -> str: return "".join(c["source"])


def _exported(src: str) -> bool: return bool(re.search(r"^#\|\s*export", src, re.M))


def _defs(src: str) -> list[str]:
    try: tree = ast.parse("\n".join(l for l in src.splitlines() if not l.startswith(("#|", "%", "!"))))
    except SyntaxError: return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not n.name.startswith("_")]


def lint(nb: Path) -> dict:
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    out = {"notebook": nb.name, "export_lines": 0, "defs": 0, "unchecked": [], "long_cells": []}
    for i, c in enumerate(cells):
        s = _src(c)
        if not _exported(s): continue
        n = len([l for l in s.splitlines() if not l.startswith("#|")])
        out["export_lines"] += n
        defs = _defs(s)
        if n > MAX_CELL_LINES:
            one_class = len(defs) == 1 and s.count("\nclass ") + s.startswith("class ") >= 1
            if not one_class: out["long_cells"].append(f"{defs[:3] or '(no def)'}: {n} lines")
        if not defs: continue
        out["defs"] += len(defs)
        nxt = next((_src(d) for d in cells[i + 1:] if not _exported(_src(d))), "")
        following = cells[i + 1] if i + 1 < len(cells) else None
        if following is None or _exported(_src(following)) or not CHECK.search(nxt): out["unchecked"] += defs
    return out


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted((ROOT / "nbs").glob("[0-9][0-9]_*.ipynb"))
    tot_defs = tot_unchecked = 0
    for p in paths:
        r = lint(p)
        tot_defs += r["defs"]; tot_unchecked += len(r["unchecked"])
        flag = " OVER" if r["export_lines"] > MAX_EXPORT_LINES else ""
        print(f"{r['notebook']:28s} exported {r['export_lines']:4d} lines{flag}; defs {r['defs']:3d}, unchecked {len(r['unchecked'])}")
        if r["unchecked"]: print("   unchecked:", ", ".join(r["unchecked"]))
        for c in r["long_cells"]: print("   long cell:", c)
    print(f"total: {tot_defs} public definitions, {tot_defs - tot_unchecked} followed by a check")
