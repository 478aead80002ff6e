"""The documentation site that `make docs` builds into _docs/, opened in headless Chromium: the model page renders its
formula and the output of its checks, each module's page documents its API, every internal link of every page
resolves to a file and anchor, and every figure loads. In CI (CI=true) a missing chromium or a missing site fails;
elsewhere those tests skip, naming what to run."""
import fcntl, json, os, re, select, shutil, subprocess, tempfile, time
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE, NBS = ROOT / "_docs", ROOT / "nbs"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# what the browser reports for each page: element ids, every URL a page loads or links to, and its images
PAGE_JS = """(() => ({
  ids: [...document.querySelectorAll('[id]')].map(e => e.id).concat([...document.querySelectorAll('a[name]')].map(e => e.name)),
  urls: [...document.querySelectorAll('a[href]')].map(e => e.href)
        .concat([...document.querySelectorAll('link[href]')].map(e => e.href))
        .concat([...document.querySelectorAll('img[src], script[src]')].map(e => e.src)),
  images: [...document.images].map(i => ({src: i.src, loaded: i.complete && i.naturalWidth > 0})),
}))()"""


def need(ok: bool, why: str):
    "Skip with `why` outside CI; in CI the site and the browser are part of the build, so their absence fails."
    if ok: return
    if IN_CI: pytest.fail(f"CI: {why}")
    pytest.skip(why)


def chromium_exe():
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


class Chromium:
    "Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): no port, no package."

    def __init__(self, exe: str, timeout: float = 30):
        self.timeout, self.profile = timeout, tempfile.mkdtemp(prefix="stem-nb-chromium-")
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()
        # the protocol's pipe is fds 3 (commands in) and 4 (replies out) of the browser; both ends first move above
        # 9, so that placing one at 3 or 4 cannot overwrite the other
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome, from_chrome)]
        for fd in (to_chrome, from_chrome): os.close(fd)
        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
                "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=lambda: (os.dup2(hi[0], 3), os.dup2(hi[1], 4)), close_fds=False,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in hi: os.close(fd)
        self._buf, self._id, self._events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session=self.session)

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer the DevTools protocol in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk: raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session: msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._message(deadline)
            if m.get("id") == self._id:
                if "error" in m: raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self._events.append(m)

    def open(self, url: str):
        "Navigate to `url` and wait for its load event (images included)."
        self._events.clear()
        self.send("Page.navigate", session=self.session, url=url)
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self._events):
            self._events.append(self._message(deadline))

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        if "exceptionDetails" in r: raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def close(self):
        try: self.send("Browser.close")
        except Exception: pass
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        os.close(self._w); os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)


def site_url() -> str:
    "The published address of the site (pyproject's Documentation URL, as nbdev reads it), without a trailing slash."
    from nbdev.config import get_config
    cfg = get_config(ROOT)
    return f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip("/")


def crawl(browser: Chromium, site: Path) -> dict:
    "Every HTML page under `site`, opened in the browser: {relative path: {ids, urls, images}}."
    return {p.relative_to(site).as_posix(): (browser.open(p.as_uri()), browser.eval(PAGE_JS))[1]
            for p in sorted(site.rglob("*.html"))}


def link_problems(pages: dict, site: Path, published: str = "") -> list[str]:
    """Each URL a page links to or loads that points into the site (a file: URL, or one under the published address)
    and does not resolve: a missing file, a target outside the site, or an anchor that its page lacks."""
    site, bad = site.resolve(), []
    for page, info in pages.items():
        for url in info["urls"]:
            base, frag = urldefrag(url)
            if published and (base + "/").startswith(published + "/"):
                base = (site / base[len(published):].lstrip("/")).as_uri()
            u = urlparse(base)
            if u.scheme != "file": continue              # the web, mailto:, data:
            f = Path(unquote(u.path))
            if f.is_dir(): f = f / "index.html"
            if not f.resolve().is_relative_to(site): bad.append(f"{page}: {url} leaves the site")
            elif not f.is_file(): bad.append(f"{page}: {url}: no such file")
            elif frag and f.suffix == ".html":
                target = pages.get(f.resolve().relative_to(site).as_posix(), {"ids": []})
                if unquote(frag) not in target["ids"]: bad.append(f"{page}: {url}: no anchor #{unquote(frag)}")
    return bad


@pytest.fixture(scope="module")
def browser():
    exe = chromium_exe()
    need(exe is not None, "headless Chromium is not installed (as root: apt-get update && apt-get install -y chromium)")
    b = Chromium(exe)
    yield b
    b.close()


@pytest.fixture(scope="module")
def pages(browser):
    need((SITE / "index.html").is_file() and (SITE / "model.html").is_file(),
         f"no documentation site in {SITE}: run `make docs`")
    return crawl(browser, SITE)


def nb_cells(name: str) -> list[dict]:
    return json.loads((NBS / name).read_text())["cells"]


def runs_in_docs(cell: dict) -> bool:
    "A code cell the site shows with its output: not exported, hidden or flagged slow/gpu/notest."
    src = "".join(cell["source"])
    dirs = set(re.findall(r"^#\|\s*([\w-]+)", src, re.M))
    return cell["cell_type"] == "code" and not dirs & {"export", "exporti", "exports", "hide", "default_exp",
                                                        "slow", "gpu", "notest"}


def test_model_page_renders_formula_and_check_outputs(browser, pages):
    "Each `$$...$$` of 06_model is typeset math on the page (same TeX, visible), and each printing check shows output."
    cells = nb_cells("06_model.ipynb")
    formulas = [f.strip() for c in cells if c["cell_type"] == "markdown"
                for f in re.findall(r"\$\$(.+?)\$\$", "".join(c["source"]), re.S)]
    printing = [c for c in cells if runs_in_docs(c) and re.search(r"^\s*print\(", "".join(c["source"]), re.M)]
    checks = [c for c in cells if runs_in_docs(c) and "test_eq(" in "".join(c["source"])]
    assert formulas and printing and checks, "06_model has no display formula, printing cell or check left to test"
    browser.open((SITE / "model.html").as_uri())
    got = browser.eval("""(() => ({
      maths: [...document.querySelectorAll('math[display="block"]')].map(m => {
        const r = m.getBoundingClientRect(), a = m.querySelector('annotation[encoding="application/x-tex"]');
        return {tex: a ? a.textContent.trim() : null, w: r.width, h: r.height}; }),
      text: document.body.innerText,
      outputs: [...document.querySelectorAll('.cell-output')].map(o => o.innerText.trim()),
      code: [...document.querySelectorAll('.cell-code')].map(c => c.innerText),
    }))()""")
    for tex in formulas:
        shown = [m for m in got["maths"] if m["tex"] == tex]
        assert shown, f"model.html does not typeset $${tex}$$ (display math on the page: {got['maths']})"
        assert all(m["w"] > 20 and m["h"] > 5 for m in shown), f"model.html: $${tex}$$ renders with no size: {shown}"
    assert "$$" not in got["text"] and "\\mathrm" not in got["text"], "model.html shows raw TeX"
    assert len([o for o in got["outputs"] if o]) >= len(printing), (
        f"model.html shows {len(got['outputs'])} outputs for {len(printing)} printing cells")
    for c in checks:                                      # the checks themselves are on the page
        first = next(l for l in "".join(c["source"]).splitlines() if "test_eq(" in l).strip()
        assert any(first in code for code in got["code"]), f"model.html lacks the check `{first}`"


def test_every_module_page_documents_its_api(pages):
    "Each public top-level symbol in nbdev's index (_modidx) has its anchor on its module's page."
    from stem_nb._modidx import d
    missing = []
    for mod, syms in d["syms"].items():
        for sym, (doc, _src) in syms.items():
            name = sym[len(mod) + 1:]
            if "." in name or name.startswith("_"): continue
            page, anchor = doc.split("#", 1)
            if anchor not in pages.get(page, {"ids": []})["ids"]: missing.append(f"{sym} -> {doc}")
    assert not missing, f"API entries missing from the site ({len(missing)}): {missing[:20]}"


def test_every_internal_link_resolves(pages):
    published = site_url()
    bad = link_problems(pages, SITE, published)
    assert not bad, f"{len(bad)} broken internal links:\n" + "\n".join(bad[:40])
    # the pages that nbs/llms.txt and the modules' `Docs:` lines point to are built
    llms = (SITE / "llms.txt").read_text()
    targets = re.findall(re.escape(published) + r"/([^)\s]+)", llms)
    assert targets, "the site's llms.txt links no page of the site"
    missing = [t for t in targets if not (SITE / t).is_file()]
    assert not missing, f"llms.txt links pages the site lacks: {missing}"


def test_figures_load(pages):
    "Every image of every page loads, and each figure in figures/ is on the site."
    broken = [f"{p}: {i['src']}" for p, info in pages.items() for i in info["images"] if not i["loaded"]]
    assert not broken, "images that do not load:\n" + "\n".join(broken)
    shown = {unquote(urlparse(i["src"]).path).rsplit("/", 1)[-1] for info in pages.values() for i in info["images"]}
    figures = sorted(p.name for p in (ROOT / "figures").glob("*.png"))
    assert figures, "figures/ has no PNG"
    assert not set(figures) - shown, f"figures not on the site: {sorted(set(figures) - shown)}"


def test_link_checker_finds_broken_links(browser, tmp_path):
    "The checks above can fail: a small site with a missing page, a missing anchor and a missing image."
    (tmp_path / "a.html").write_text('<h1 id="top">a</h1><a href="b.html#here">ok</a><a href="b.html#gone">x</a>'
                                     '<a href="c.html">x</a><a href="https://stem.example/b.html#gone">web</a>'
                                     '<a href="../outside.html">x</a><img src="missing.png">')
    (tmp_path / "b.html").write_text('<h2 id="here">b</h2><a href="https://pub.example/site/a.html#nope">x</a>')
    pages = crawl(browser, tmp_path)
    assert sorted(pages) == ["a.html", "b.html"]
    bad = link_problems(pages, tmp_path, "https://pub.example/site")
    assert [re.sub(r"file://\S*/", "", b) for b in bad] == [
        "a.html: b.html#gone: no anchor #gone", "a.html: c.html: no such file",
        "a.html: outside.html leaves the site", "a.html: missing.png: no such file",
        "b.html: https://pub.example/site/a.html#nope: no anchor #nope"], bad
    assert [i["loaded"] for i in pages["a.html"]["images"]] == [False]
