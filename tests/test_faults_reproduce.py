"""Reproduce re-runs as a user meets them, from the command line in a scratch copy of the repo:
`--force` on a failing notebook keeps the previous results, a failed run is quarantined and reported, an edited
notebook re-runs, a deleted output table re-runs its experiment, Ctrl-C exits 130 without a traceback, and a
second clone writes into itself.
Each case checks the message, the exit code, and that what was written before is unchanged (checksums)."""
import hashlib, json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import nbformat, pytest, yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("STEM_NB_ROOT", None)

TOY = """from pathlib import Path
import time
flags = Path(runs_dir)
(Path(figures_dir) / "tables").mkdir(parents=True, exist_ok=True)
(Path(figures_dir) / "tables" / "toy.md").write_text(f"### toy {v} ({'partial' if (flags / 'make_toy_fail').exists() else 'complete'})\\n")
(Path(figures_dir) / "toy.png").write_bytes(b"png" * 400)
if (flags / "make_toy_sleep").exists():
    print("sleeping", flush=True); time.sleep(120)
if (flags / "make_toy_fail").exists(): raise RuntimeError("toy failed on purpose")
"""


def write_toy(root: Path, extra: str = ""):
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell("v = 0\nfigures_dir = 'f'\nruns_dir = 'runs'"); p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# toy experiment"), p, nbformat.v4.new_code_cell(TOY + extra)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(root / "experiments" / "toy.ipynb"))


def make_clone(root: Path) -> Path:
    "A scratch checkout: the repo's experiments/ (presets included), a toy experiment in `smoke` and `cpu`, a README."
    shutil.copytree(ROOT / "experiments", root / "experiments")
    presets = yaml.safe_load((root / "experiments" / "presets.yaml").read_text())
    for name in ("smoke", "cpu"): presets[name]["experiments"]["toy"] = {"v": 7}
    (root / "experiments" / "presets.yaml").write_text(yaml.safe_dump(presets, sort_keys=False))
    write_toy(root)
    (root / "README.md").write_text("# clone\n<!-- results:start -->\nhand-written\n<!-- results:end -->\nend\n")
    return root


def run(root: Path, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "stem-nb"), "reproduce", *args], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**ENV, **kw.pop("env", {})}, **kw)


def checksums(*dirs: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs if d.exists() for p in sorted(d.rglob("*")) if p.is_file()}


def done_dirs(root: Path, preset: str = "smoke") -> list[Path]:
    return sorted(p.parent for p in (root / "runs" / preset / "toy").glob("*/DONE"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    root = make_clone(tmp_path_factory.mktemp("clone"))
    r = run(root, "--preset", "smoke", "--only", "toy")
    assert r.returncode == 0, r.stderr
    return root


def test_first_run_writes_results_without_warnings(clone):
    r = run(clone, "--preset", "smoke", "--only", "toy")             # complete: skipped
    assert r.returncode == 0 and "skipped (complete)" in r.stdout, r.stdout + r.stderr
    figs = clone / "runs" / "smoke" / "figures"
    assert (figs / "tables" / "toy.md").read_text() == "### toy 7 (complete)\n"
    (d,) = done_dirs(clone)
    assert (d / "log.txt").exists() and (d / "executed.ipynb").exists()
    params = json.loads((d / "params.json").read_text())
    assert params["v"] == 7 and params["runs_dir"] == str(clone / "runs")
    assert set(json.loads((d / "params.json").read_text())) == {"v", "figures_dir", "runs_dir"}   # only what toy declares


def test_driver_output_has_no_papermill_or_kernel_warnings(tmp_path):
    root = make_clone(tmp_path)
    r = run(root, "--preset", "smoke", "--only", "toy")
    assert r.returncode == 0, r.stderr
    assert "Passed unknown parameter" not in r.stderr + r.stdout
    assert "without encryption" not in r.stderr + r.stdout


def test_force_on_failing_notebook_keeps_previous_results(clone):
    figs = clone / "runs" / "smoke" / "figures"
    before = checksums(figs, *done_dirs(clone))
    (clone / "runs" / "make_toy_fail").write_text("")
    try: r = run(clone, "--preset", "smoke", "--only", "toy", "--force")
    finally: (clone / "runs" / "make_toy_fail").unlink()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "RuntimeError: toy failed on purpose" in r.stdout
    assert "toy failed; its outputs are in runs/smoke/failed/toy-" in r.stderr and "previous results are unchanged" in r.stderr
    assert checksums(figs, *done_dirs(clone)) == before                       # figures and previous run untouched
    (q,) = (clone / "runs" / "smoke" / "failed").glob("toy-*")              # the failed run's outputs, quarantined
    assert (q / "figures" / "tables" / "toy.md").read_text() == "### toy 7 (partial)\n"
    err = (q / "ERROR.txt").read_text()                                      # the error and the failing cell's traceback
    assert err.startswith("RuntimeError: toy failed on purpose\n") and 'raise RuntimeError("toy failed on purpose")' in err, err
    assert (q / "log.txt").exists() and (q / "executed.ipynb").exists()
    st = {s["name"]: s for s in json.loads((clone / "runs" / "smoke" / "status.json").read_text())}["toy"]
    assert st["status"] == "FAILED: RuntimeError: toy failed on purpose" and st["last_success"]
    assert not list((clone / "runs" / "smoke" / "toy").glob(".stage-*"))
    # without --force, the same command finds the previous complete run of this key and reports it done
    r = run(clone, "--preset", "smoke", "--only", "toy")
    assert r.returncode == 0 and "skipped (complete)" in r.stdout, r.stdout + r.stderr
    st = {s["name"]: s for s in json.loads((clone / "runs" / "smoke" / "status.json").read_text())}["toy"]
    assert st["status"] == "done" and checksums(figs, *done_dirs(clone)) == before


def test_edited_notebook_reruns(tmp_path):
    root = make_clone(tmp_path)
    assert run(root, "--preset", "smoke", "--only", "toy").returncode == 0
    (old,) = done_dirs(root)
    r = run(root, "--preset", "smoke", "--only", "toy")
    assert "skipped (complete)" in r.stdout
    write_toy(root, extra="print('edited')\n")
    r = run(root, "--preset", "smoke", "--only", "toy")
    assert r.returncode == 0 and " done " in r.stdout, r.stdout + r.stderr
    assert len(done_dirs(root)) == 2 and old in done_dirs(root)               # a new key; the old run stays


def test_failed_run_in_readme_comes_from_the_generator(tmp_path):
    root = make_clone(tmp_path)
    presets = yaml.safe_load((root / "experiments" / "presets.yaml").read_text())
    presets["cpu"]["experiments"] = {"toy": {"v": 7}}
    (root / "experiments" / "presets.yaml").write_text(yaml.safe_dump(presets, sort_keys=False))
    assert run(root, "--preset", "cpu").returncode == 0
    readme = (root / "README.md").read_text()
    assert "hand-written" not in readme and readme.startswith("# clone\n") and readme.endswith("end\n")
    assert "| toy | done |" in readme and "#### toy 7 (complete)" in readme and "![toy](figures/toy.png)" in readme
    figs = checksums(root / "figures")
    (root / "runs" / "make_toy_fail").write_text("")
    r = run(root, "--preset", "cpu", "--force")
    assert r.returncode == 1
    readme = (root / "README.md").read_text()
    assert "| toy | **failed** (RuntimeError: toy failed on purpose); tables/figures shown are from 20" in readme
    assert "#### toy 7 (complete)" in readme and "partial" not in readme      # the table shown is the last good one
    assert checksums(root / "figures") == figs


def test_ctrl_c_exits_130_and_resumes(tmp_path):
    root = make_clone(tmp_path)
    (root / "runs").mkdir(); (root / "runs" / "make_toy_sleep").write_text("")
    p = subprocess.Popen([str(BIN / "stem-nb"), "reproduce", "--preset", "smoke", "--only", "toy"], cwd=root, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any("sleeping" in l.read_text() for l in root.glob("runs/smoke/toy/.stage-*/log.txt")):
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)                                            # what a terminal's Ctrl-C does
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out + err
    assert "re-run the same command to resume" in err and "Traceback" not in err, err
    assert not list(root.glob("runs/smoke/toy/.stage-*")) and not done_dirs(root)
    assert not (root / "runs" / "smoke" / "failed").exists()                   # an interrupt is not a failure
    (root / "runs" / "make_toy_sleep").unlink()
    r = run(root, "--preset", "smoke", "--only", "toy")
    assert r.returncode == 0 and len(done_dirs(root)) == 1, r.stdout + r.stderr


def written_under(root: Path) -> list[str]:
    "Every file and folder under `root`/runs (none when it has no runs/)."
    return sorted(str(p) for p in (root / "runs").rglob("*"))


def test_second_clone_writes_into_the_working_directory(tmp_path):
    "The working directory's checkout wins over STEM_NB_ROOT and over the checkout the package is installed from."
    first, second = make_clone(tmp_path / "first"), make_clone(tmp_path / "second")
    ours = written_under(ROOT)                                                  # the checkout this suite runs from, as it is
    r = run(second, "--preset", "smoke", "--only", "toy", env={"STEM_NB_ROOT": str(first)})
    assert r.returncode == 0, r.stderr
    (d,) = done_dirs(second)
    params = json.loads((d / "params.json").read_text())                        # what the notebook was told to write into
    assert params["runs_dir"] == str(second / "runs"), params
    assert params["figures_dir"].startswith(f"{second / 'runs' / 'smoke' / 'toy'}/.stage-"), params   # staged, then moved to d
    assert (second / "runs" / "smoke" / "figures" / "tables" / "toy.md").read_text() == "### toy 7 (complete)\n"
    assert not (first / "runs").exists()
    assert [p for p in written_under(ROOT) if p not in ours and "/toy" in p] == []   # nor into the installed checkout
    # outside any checkout, STEM_NB_ROOT names the checkout
    r = subprocess.run([str(BIN / "stem-nb"), "reproduce", "--preset", "smoke", "--only", "toy"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**ENV, "STEM_NB_ROOT": str(first)})
    assert r.returncode == 0, r.stderr
    (d,) = done_dirs(first)
    assert json.loads((d / "params.json").read_text())["runs_dir"] == str(first / "runs")
    assert not (tmp_path / "runs").exists() and len(done_dirs(second)) == 1


def test_deleted_output_table_reruns_its_experiment(tmp_path):
    "A complete experiment whose table was deleted is not 'skipped (complete)': it runs again, says why, and restores it."
    root = make_clone(tmp_path)
    assert run(root, "--preset", "smoke", "--only", "toy").returncode == 0
    figs = root / "runs" / "smoke" / "figures"
    (figs / "tables" / "toy.md").unlink()
    before = checksums(figs)                                                    # what is left: toy.png
    assert before and all(not k.endswith("toy.md") for k in before)
    r = run(root, "--preset", "smoke", "--only", "toy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"toy: ran before, but its output {figs / 'tables' / 'toy.md'} is missing: running it again" in r.stdout, r.stdout
    assert "skipped" not in r.stdout and " done " in r.stdout, r.stdout
    assert (figs / "tables" / "toy.md").read_text() == "### toy 7 (complete)\n"
    assert {k: v for k, v in checksums(figs).items() if k in before} == before    # the rest is byte for byte as it was
    assert len(done_dirs(root)) == 1
    st = {s["name"]: s for s in json.loads((root / "runs" / "smoke" / "status.json").read_text())}["toy"]
    assert st["status"] == "done" and "tables/toy.md" in st["outputs"]
    r = run(root, "--preset", "smoke", "--only", "toy")                         # complete again: skipped
    assert r.returncode == 0 and "skipped (complete)" in r.stdout, r.stdout + r.stderr
