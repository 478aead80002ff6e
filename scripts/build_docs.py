"""Build the documentation site into `_docs/` (`make docs`): nbdev's doc pipeline, rendered by pandoc.

  .venv/bin/python scripts/build_docs.py                  # the whole site
  .venv/bin/python scripts/build_docs.py --only 06_model  # the index and one notebook (for working on the site)
  .venv/bin/python scripts/build_docs.py --render-only    # render again what the last build ran (styles, layout)

1. stage    nbs/*.ipynb -> _docs_run/, without the cells flagged with one of `tst_flags` (`#| slow`, `#| gpu`,
            `#| notest`): the cells nbdev-test leaves out, so building the site never runs them. The prose that
            follows a notebook's title and description moves to a cell of its own. nbs/ is only read.
2. run      each staged notebook through nbdev's doc processors (what `nbdev-docs` runs: a `show_doc` for every
            export, backticked names linked to their page, export and hidden cells removed) -> _proc/, with nbdev's
            show_doc executor running every cell that nbdev-test runs, in one kernel per notebook, in the notebook's
            folder, with the configured cell timeout: one execution gives the API docs and the checks' outputs, and a
            failing check fails the build.
3. render   every processed notebook -> pandoc markdown -> `_docs/<page>.html` (formulas as MathML, which browsers
            render without a script or a network) and `_docs/<page>.html.md`, the pages that the modules' `Docs:`
            lines and nbs/llms.txt name. Links into the site's published address become relative; local images
            (figures/*.png) are copied in.

Quarto, which `nbdev-docs` renders with, is not used: its PyPI package (`quarto-cli`) is a source distribution
that downloads the quarto binary from GitHub when it is built. pandoc, the converter quarto itself runs, comes
as a binary inside the `pypandoc-binary` wheel.
"""
from __future__ import annotations

import argparse, base64, html, os, re, shutil, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from fastcore.nbio import mk_cell, read_nb, write_nb
from nbdev.config import get_config, nbpath2html
from nbdev.process import NBProcessor
from nbdev.processors import FilterDefaults, exec_show_docs
from nbdev.test import _skip_cell

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / "_docs_run"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def pandoc_path() -> str:
    "The pandoc binary of the `pypandoc-binary` wheel (`make docs` installs it)."
    try:
        import pypandoc
    except ImportError as e:
        raise SystemExit("build_docs: pandoc comes from the `pypandoc-binary` package: run `make docs`, "
                         "or `.venv/bin/pip install pypandoc-binary`") from e
    return pypandoc.get_pandoc_path()


# ---- 1. stage --------------------------------------------------------------------------------------------------
def split_title_cell(nb):
    """The first markdown cell as nbdev's frontmatter reads it: `# title` and `> description` alone in it (a
    description over several `>` lines joined, as nbdev-export joins it), the prose after them in a cell of its own.
    nbdev drops the whole title cell from the page, and takes only the first `>` line as the description."""
    i = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"), None)
    if i is None: return
    lines = nb.cells[i].source.splitlines()
    t = next((j for j, l in enumerate(lines) if re.match(r"#\s+\S", l)), None)
    if t is None: return
    d = t + 1
    while d < len(lines) and lines[d].startswith(">"): d += 1
    desc = " ".join(l.lstrip(">").strip() for l in lines[t + 1:d]).strip()
    rest = "\n".join(lines[:t] + lines[d:]).strip()
    nb.cells[i].source = lines[t] + (f"\n> {desc}" if desc else "")
    if rest: nb.cells.insert(i + 1, mk_cell(rest, "markdown"))


def stage(cfg, only: list[str]) -> list[Path]:
    "Copy the notebooks to RUN_DIR without the cells nbdev-test skips (those with a `tst_flags` directive)."
    flags = set(str(cfg.tst_flags).split())
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir()
    out = []
    for src in sorted(cfg.nbs_path.glob("*.ipynb")):
        if only and src.stem != "index" and src.stem not in only: continue
        nb = read_nb(src)
        nb.cells = [c for c in nb.cells if not (c.cell_type == "code" and flags & set(c.directives))]
        split_title_cell(nb)
        write_nb(nb, RUN_DIR / src.name)
        out.append(RUN_DIR / src.name)
    if only and len(out) != len(set(only)) + (cfg.nbs_path / "index.ipynb").exists():
        raise SystemExit(f"build_docs: --only {only}: no such notebook in {cfg.nbs_path}")
    return out


# ---- 2. run ----------------------------------------------------------------------------------------------------
class exec_cells(exec_show_docs):
    """nbdev's show_doc executor, running every cell nbdev-test runs (in order, in one kernel) rather than only the
    imports, exports and show_docs: one execution gives the page both its API docs and its checks' outputs."""
    def begin(self):
        super().begin()
        if not hasattr(self, "k"): return
        cfg = get_config()
        self.k.set_path(Path(self.nb.path_).parent)
        self.timeout = cfg.cell_timeout or None
        self.skip = _skip_cell(self.nb, str(cfg.tst_flags).split())

    def __call__(self, cell):
        if not hasattr(self, "k") or self.skip(cell): return
        self.k.cell(cell, timeout=self.timeout)
        if (e := self.k.exc):
            tb = "".join(o.get("traceback", [""])[-1] for o in cell.outputs if o.get("output_type") == "error")
            raise RuntimeError(f"{Path(self.nb.path_).name}, cell {cell.idx_}:\n{cell.source}\n"
                               f"{type(e).__name__}: {e}\n{tb}")


def process_one(job: tuple[Path, Path]) -> float:
    "Run and process one staged notebook in this worker: the notebook's folder is the working directory, as in nbdev-test."
    (src, dst), t0 = job, time.time()
    os.chdir(src.parent)
    os.environ["IN_TEST"] = "1"                      # what nbdev-test and nbdev's doc processing set
    nb, main = read_nb(src), sys.modules["__main__"]
    procs = [exec_cells if p is exec_show_docs else p for p in FilterDefaults().procs()]
    try: NBProcessor(nb=nb, procs=procs, rm_directives="quarto").process()
    finally: sys.modules["__main__"] = main       # IPython's shell takes `__main__`; the pool's next job needs it back
    write_nb(nb, dst)
    return time.time() - t0


def execute_and_process(cfg, staged: list[Path], n_workers: int) -> Path:
    "Each staged notebook run and processed by nbdev's doc processors into _proc/, n_workers at a time."
    from fastcore.parallel import parallel
    proc = cfg.config_path / "_proc"
    shutil.rmtree(proc, ignore_errors=True)
    proc.mkdir()
    times = parallel(process_one, [(p, proc / p.name) for p in staged], n_workers=n_workers, pause=0.01)
    for p, t in sorted(zip(staged, times), key=lambda o: -o[1]): print(f"{p.name}: {t:.0f} s")
    return proc


# ---- 3. render -------------------------------------------------------------------------------------------------
# pandoc's markdown, read as Jupyter reads a notebook's markdown: a list or a heading needs no blank line before it
MD_FORMAT = "markdown+lists_without_preceding_blankline-blank_before_header-blank_before_blockquote"
_re_opt = re.compile(r"^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$")
_re_fm = re.compile(r"^---\s*\n(.*?)\n---\s*$", re.S)
_re_img = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)|(<img\b[^>]*?\bsrc=[\"'])([^\"']+)")


def cell_options(src: str) -> tuple[dict, str]:
    "Quarto cell options (`#| echo: false`) leading a code cell's source, and the code after them."
    opts, lines = {}, src.splitlines()
    while lines and (m := _re_opt.match(lines[0])):
        opts[m.group(1)] = yaml.safe_load(m.group(2)) if m.group(2) else None
        lines.pop(0)
    return opts, "\n".join(lines)


def fenced(text: str, attrs: str) -> str:
    "`text` as a fenced block whose fence no line of `text` can close."
    runs = [len(m) for m in re.findall(r"`{3,}", text)]
    fence = "`" * max([3] + [n + 1 for n in runs])
    return f"{fence}{{{attrs}}}\n{text.rstrip(chr(10))}\n{fence}"


_re_ansi = re.compile(r"\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])")


def _text(v) -> str: return _re_ansi.sub("", "".join(v) if isinstance(v, list) else str(v))


class Page:
    "One processed notebook as pandoc markdown; its output images go to `<page>_files/`."

    def __init__(self, path: Path, out_dir: Path):
        self.path, self.out_dir = path, out_dir
        self.nb = read_nb(path)
        self.html = nbpath2html(path).name
        self.files = f"{Path(self.html).stem}_files"
        self.meta, self.n_img = {}, 0
        cells = self.nb.cells
        if cells and cells[0].cell_type == "raw" and (m := _re_fm.match(cells[0].source.strip())):
            self.meta = yaml.safe_load(m.group(1)) or {}
            cells = cells[1:]
        self.cells = cells
        self.html = self.meta.get("output-file", self.html)
        self.title = str(self.meta.get("title") or Path(self.html).stem)

    def _image(self, data: bytes, ext: str) -> str:
        self.n_img += 1
        rel = f"{self.files}/output-{self.n_img}.{ext}"
        (self.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.out_dir / rel).write_bytes(data)
        return rel

    def output(self, o, asis: bool) -> str:
        if o.output_type == "stream":
            return _text(o.text) if asis else fenced(_text(o.text), f".cell-output .cell-output-{o.name}")
        if o.output_type == "error":
            return fenced(_text("\n".join(o.get("traceback", [])) or f"{o.ename}: {o.evalue}"), ".cell-output .cell-output-error")
        d = o.get("data", {})
        if "text/markdown" in d:
            md = _text(d["text/markdown"])
            return md if asis else f"::: {{.cell-output .cell-output-display}}\n{md}\n:::"
        if "text/html" in d: return fenced(_text(d["text/html"]), "=html")
        for mime, ext in (("image/png", "png"), ("image/jpeg", "jpg")):
            if mime in d:
                return f"![]({self._image(base64.b64decode(_text(d[mime])), ext)}){{.cell-output-display}}"
        if "image/svg+xml" in d: return f"![]({self._image(_text(d['image/svg+xml']).encode(), 'svg')})"
        if "text/plain" in d: return fenced(_text(d["text/plain"]), ".cell-output .cell-output-display")
        return ""

    def markdown(self) -> str:
        meta = {"title": self.title, "pagetitle": self.title}
        if self.meta.get("description"): meta["subtitle"] = str(self.meta["description"])
        parts = ["---\n" + yaml.safe_dump(meta, allow_unicode=True) + "---"]
        for c in self.cells:
            if c.cell_type == "markdown": parts.append(c.source)
            elif c.cell_type == "raw": parts.append(c.source)
            elif c.cell_type == "code":
                opts, src = cell_options(c.source)
                if opts.get("include") is False: continue
                block = []
                if opts.get("echo", True) is not False and src.strip(): block.append(fenced(src, ".python .cell-code"))
                if opts.get("output", True) is not False:
                    asis = opts.get("output") == "asis"
                    block += [s for o in c.get("outputs", []) if (s := self.output(o, asis))]
                if not block: continue
                body = "\n\n".join(block)
                parts.append(body if opts.get("output") == "asis" else f"::: {{.cell}}\n{body}\n:::")
        return "\n\n".join(parts) + "\n"


def site_url(cfg) -> str:
    "Where the site is published (`[project.urls] Documentation`), without a trailing slash."
    return f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip("/") if cfg.doc_host else ""


def relink(md: str, cfg, out_dir: Path) -> str:
    "Links into the published site made relative; local images copied into the site, their links rewritten."
    if (url := site_url(cfg)):
        md = re.sub(r"(\]\(|href=[\"'])" + re.escape(url + "/"), r"\1", md)

    def _img(m):
        pre, target = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if re.match(r"^[a-z][a-z0-9+.-]*:|^[/#]", target, re.I): return m.group(0)
        for base in (cfg.nbs_path, cfg.config_path):
            f = (base / target).resolve()
            if f.is_file() and f.is_relative_to(cfg.config_path) and (out_dir / target).resolve() != f:
                rel = f.relative_to(cfg.config_path)
                if not (out_dir / rel).exists():
                    (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out_dir / rel)
                return pre + rel.as_posix()
        return m.group(0)
    return _re_img.sub(_img, md)


def nav_html(pages: list[Page], current: Page, cfg) -> str:
    active = ' class="active"'
    items = "\n".join(f'<li><a href="{p.html}"{active if p is current else ""}>{html.escape(p.title)}</a></li>'
                      for p in pages)
    return (f'<nav id="sidebar" aria-label="pages">\n<a class="site-title" href="index.html">{html.escape(cfg.title)}</a>\n'
            f"<ul>\n{items}\n</ul>\n</nav>\n")


def render(cfg, proc: Path, out_dir: Path, n_workers: int = 1):
    "Every processed notebook -> out_dir/<page>.html and <page>.html.md; styles, llms.txt and images beside them."
    pandoc = pandoc_path()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    pages = [Page(p, out_dir) for p in sorted(proc.glob("*.ipynb"))]
    pages.sort(key=lambda p: (p.html != "index.html", p.path.name))
    work = proc / "_site_src"
    work.mkdir(exist_ok=True)
    css = cfg.nbs_path / "styles.css"
    if css.exists(): shutil.copy2(css, out_dir / "styles.css")
    if (cfg.nbs_path / "llms.txt").exists(): shutil.copy2(cfg.nbs_path / "llms.txt", out_dir / "llms.txt")
    jobs = []
    for p in pages:
        stem = Path(p.html).stem
        (work / f"{stem}.md").write_text(relink(p.markdown(), cfg, out_dir))
        (work / f"{stem}.nav.html").write_text(nav_html(pages, p, cfg))
        common = [pandoc, str(work / f"{stem}.md"), "--from", MD_FORMAT, "--resource-path", str(out_dir)]
        html_args = ["--to", "html5", "--standalone", "--mathml", "--toc", "--toc-depth", "3",
                     "--syntax-highlighting", "pygments", "--include-before-body", str(work / f"{stem}.nav.html"),
                     "--output", str(out_dir / p.html)] + (["--css", "styles.css"] if css.exists() else [])
        jobs += [(p, common + html_args), (p, common + ["--to", "gfm", "--output", str(out_dir / f"{p.html}.md")])]

    def _pandoc(job):
        p, cmd = job
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode: raise SystemExit(f"build_docs: pandoc failed on {p.path.name}:\n{r.stderr}")
        if r.stderr.strip(): print(f"{p.path.name}: {r.stderr.strip()}", file=sys.stderr)
    with ThreadPoolExecutor(max(1, n_workers)) as ex: list(ex.map(_pandoc, jobs))
    print(f"build_docs: {len(pages)} pages -> {out_dir}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=[], help="notebook names (e.g. 06_model); the index always comes")
    ap.add_argument("--n-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--render-only", action="store_true", help="render the notebooks the last build ran (_proc/)")
    a = ap.parse_args(argv)
    cfg = get_config(ROOT)
    os.environ.update(OFFLINE)           # the notebooks run as `make test` runs them: no network
    pandoc_path()                        # fail before the notebooks run, not after
    t0 = time.time()
    if a.render_only:
        proc = cfg.config_path / "_proc"
        if not list(proc.glob("*.ipynb")): raise SystemExit(f"build_docs: --render-only: nothing in {proc} yet")
    else: proc = execute_and_process(cfg, stage(cfg, a.only), a.n_workers)
    t1 = time.time()
    render(cfg, proc, cfg.doc_path, a.n_workers)
    print(f"build_docs: run and process {t1 - t0:.0f} s, render {time.time() - t1:.0f} s")


if __name__ == "__main__":
    main()
