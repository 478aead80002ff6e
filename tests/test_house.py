"""The house rules that cross notebooks: notebook order is the dependency order, every module is covered by the
package docs, and the exported library is in sync with the notebooks' names."""
import ast, json, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS, LIB = ROOT / "nbs", ROOT / "stem_nb"


def notebook_modules() -> list[tuple[str, str]]:
    "(notebook file, module) in notebook order, from each notebook's `#| default_exp`."
    out = []
    for nb in sorted(NBS.glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        mods = [m.group(1) for c in cells if c["cell_type"] == "code"
                for m in [re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(c["source"]), re.M)] if m]
        assert len(mods) == 1, f"{nb.name}: expected one `#| default_exp`, found {mods}"
        out.append((nb.name, mods[0]))
    return out


def stem_imports(path: Path) -> set[str]:
    "Every stem_nb module `path` imports, at top level or inside functions (relative, absolute, importlib strings)."
    tree, found = ast.parse(path.read_text()), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module: found.add(node.module.split(".")[0])
            elif node.level == 1: found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("stem_nb"):
                parts = node.module.split(".")
                if len(parts) > 1: found.add(parts[1])
                else: found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("stem_nb."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(r"stem_nb\.(\w+)", node.value)       # importlib.import_module("stem_nb.x") and friends
            if m: found.add(m.group(1))
    return found


def test_notebook_order_is_dependency_order():
    order = [m for _, m in notebook_modules()]
    assert len(order) == len(set(order)), f"two notebooks export the same module: {order}"
    pos = {m: i for i, m in enumerate(order)}
    bad = []
    for m in order:
        f = LIB / f"{m}.py"
        assert f.is_file(), f"{f} missing: run nbdev-export"
        for dep in stem_imports(f) - {m}:
            if dep.startswith("_"): continue
            if dep not in pos: bad.append(f"{m} imports unknown stem_nb.{dep}")
            elif pos[dep] > pos[m]: bad.append(f"{m} (#{pos[m]:02d}) imports the later {dep} (#{pos[dep]:02d})")
    assert not bad, "forward imports:\n" + "\n".join(bad)


def test_every_module_has_a_notebook():
    mods = {m for _, m in notebook_modules()}
    files = {p.stem for p in LIB.glob("*.py") if not p.name.startswith("_")}
    assert files == mods, f"modules without a notebook: {sorted(files - mods)}; notebooks without a module: {sorted(mods - files)}"


def test_modules_import_in_notebook_order():
    "A fresh interpreter imports each module in notebook order: a cycle or a broken import fails here, naming the module."
    mods = [m for _, m in notebook_modules()]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module('stem_nb.' + m)\n    print('ok', m)"
    r = subprocess.run([sys.executable, "-c", code, *mods], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"import failed after {r.stdout.split()[-1:] or 'none'}:\n{r.stderr[-3000:]}"
    assert r.stdout.split()[1::2] == mods


def test_package_docs_cover_every_module():
    "stem_nb/__init__.py's docstring and nbs/llms.txt (both written by nbdev-export) list every module."
    mods = [m for _, m in notebook_modules()]
    init_doc = ast.get_docstring(ast.parse((LIB / "__init__.py").read_text())) or ""
    llms = (NBS / "llms.txt").read_text()
    missing = [m for m in mods if f"`stem_nb.{m}`" not in init_doc or f"stem_nb.{m}]" not in llms]
    assert not missing, f"modules missing from the package docs (give the notebook a two-line `>` description): {missing}"


HARNESS = "bench"        # the benchmark notebook: every `stem-nb bench` entry, the peers and the timer live there


def _top_level_names(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _imports_transformers(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "transformers" for a in node.names): return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "transformers": return True
    return False


def test_core_holds_no_benchmark():
    """The modules before the benchmark notebook (the core a reader learns STEM from) define no benchmark, no timer
    and no peer, and none imports `transformers` (the peers' library), not even inside a function."""
    order = [m for _, m in notebook_modules()]
    assert HARNESS in order, f"no notebook exports stem_nb.{HARNESS}"
    bad = []
    for m in order[:order.index(HARNESS)]:
        tree = ast.parse((LIB / f"{m}.py").read_text())
        names = {n for n in _top_level_names(tree) if re.match(r"_?bench|time_interleaved$|paired_speedup$|peak_rss_mb$|hf_llama", n)}
        if names: bad.append(f"{m} defines {sorted(names)}")
        if _imports_transformers(tree): bad.append(f"{m} imports transformers")
    assert not bad, "harness code in the core:\n" + "\n".join(bad)
    bench = _top_level_names(ast.parse((LIB / f"{HARNESS}.py").read_text()))
    assert {"time_interleaved", "paired_speedup", "timing_summary", "peak_rss_mb", "hf_llama"} <= bench, sorted(bench)
    assert len({n for n in bench if n.startswith("bench_")}) >= 8, sorted(bench)      # every `stem-nb bench` entry


def test_notebooks_read_as_taught():
    """scripts/notebook_lint.py's rules: each notebook exports at most 450 lines, every exported public definition is
    followed by a check, and no export cell is over 40 lines unless it is one class."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try: from notebook_lint import lint, MAX_EXPORT_LINES
    finally: sys.path.pop(0)
    bad = []
    for nb, _ in notebook_modules():
        r = lint(NBS / nb)
        if r["export_lines"] > MAX_EXPORT_LINES: bad.append(f"{nb}: exports {r['export_lines']} lines (> {MAX_EXPORT_LINES})")
        if r["unchecked"]: bad.append(f"{nb}: no check after {r['unchecked']}")
        if r["long_cells"]: bad.append(f"{nb}: export cells over 40 lines: {r['long_cells']}")
    assert not bad, "\n".join(bad)
