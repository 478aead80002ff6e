"The main job through papermill: the smoke preset end to end, skip-when-complete, and the paper presets' dry run."
import json, os, re, shutil, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest

from checks import check_png, check_table
from stem_nb.reproduce import plan, reproduce, load_presets, figures_dir_for, declared_parameters, DRIVER_PARAMS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    "A scratch copy of experiments/ so the test never touches the committed figures or runs/."
    root = tmp_path_factory.mktemp("repro")
    shutil.copytree(ROOT / "experiments", root / "experiments")
    return root


# notebooks with a test of their own, run once there, not twice: tests/test_relatives_experiment.py runs `relatives` at the
# smoke preset's size (through `reproduce('relatives')`, which publishes to figures/ and README); tests/test_curves.py
# runs Figure 9 under the smoke preset
OWN_TEST = {"relatives", "fig9_bpb_vs_flops"}


def smoke_names(root: Path) -> list[str]:
    return [r["name"] for r in plan("smoke", presets=load_presets(root / "experiments" / "presets.yaml")) if r["name"] not in OWN_TEST]


# the fixture runs 13 notebooks (14 took 729 s in CI on 2026-12-03): whichever test builds it gets 30 minutes, not the suite's 15
SMOKE_TIMEOUT = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def smoke_status(smoke_root):
    return reproduce("smoke", only=smoke_names(smoke_root), root=smoke_root, progress=False)


@SMOKE_TIMEOUT
def test_smoke_runs_every_notebook(smoke_status, smoke_root):
    names = smoke_names(smoke_root)
    assert set(names) | OWN_TEST == {p.stem for p in (ROOT / "experiments").glob("*.ipynb")}   # every notebook, here or in its own test
    assert [s["name"] for s in smoke_status] == names
    failed = [s for s in smoke_status if s["status"] != "done"]
    assert not failed, failed
    for n in names:   # executed notebooks are kept under runs/, never under nbs/
        assert list((smoke_root / "runs" / "smoke" / n).glob("*/executed.ipynb")), n


@SMOKE_TIMEOUT
def test_smoke_writes_tables_with_paper_beside_ours(smoke_status, smoke_root):
    "Each experiment's outputs (recorded in its DONE) are in the figures folder, byte for byte the copies in its run folder."
    figs = smoke_root / "runs" / "smoke" / "figures"
    for s in [s for s in smoke_status if s["status"] == "done"]:
        assert s["outputs"], (s["name"], "wrote no table or figure")
        run = smoke_root / "runs" / "smoke" / s["name"] / s["hash"]
        for o in s["outputs"]:
            assert (figs / o).read_bytes() == (run / "figures" / o).read_bytes(), (s["name"], o)
            if o.endswith(".png"): check_png(figs / o)
            if o.endswith(".md"): check_table(figs / o)
    t = pd.read_csv(figs / "tables" / "table_350m.csv", dtype=str).set_index("model")
    from stem_nb.paper import PAPER_350M
    for v in ("Baseline", "STEM 1/3"):                      # the paper's numbers sit beside ours, row by row
        assert float(t.loc[v, "paper Avg"]) == PAPER_350M[v]["avg"], t.loc[v]
        assert t.loc[v, "arc_easy"].endswith(f"[paper {PAPER_350M[v]['acc'][0]:.2f}]"), t.loc[v, "arc_easy"]


@SMOKE_TIMEOUT
def test_second_run_skips_complete(smoke_status, smoke_root):
    again = reproduce("smoke", only=["table1_efficiency", "fig3_loss_flops"], root=smoke_root, progress=False)
    assert all(s["status"].startswith("skipped") for s in again), again


def test_unknown_preset_and_experiment_are_errors():
    r = subprocess.run([str(BIN / "stem-nb"), "reproduce", "--preset", "nope"], capture_output=True, text=True)
    assert r.returncode != 0 and "nope" in r.stderr
    r = subprocess.run([str(BIN / "stem-nb"), "reproduce", "--preset", "smoke", "--only", "table_9"], capture_output=True, text=True)
    assert r.returncode != 0 and "table_9" in r.stderr


def test_paper_preset_dry_run_prints_plan_params_and_launch():
    r = subprocess.run([str(BIN / "stem-nb"), "reproduce", "--preset", "paper-1b", "--dry-run"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "table_1b" in r.stdout and "torchrun" in r.stdout and "6.668" in r.stdout   # STEM 1/3 total params (B)
    assert "tokens/step" in r.stdout and "is missing: run `" in r.stdout                 # the recipe and its inputs
    assert "# memory plan of 2 run(s): train_1b STEM 1/3 seed 0, midtrain STEM 1/3 seed 0" in r.stdout, r.stdout


def test_cpu_preset_dry_run_prints_the_memory_of_each_run_against_this_machine():
    r = subprocess.run([str(BIN / "stem-nb"), "reproduce", "--preset", "cpu", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plans = r.stdout.split("# memory plan of ")[1:]
    labels = [l for p in plans for l in p.splitlines()[0].split(": ", 1)[1].split(", ")]
    assert len(labels) == len(set(labels)) and "train_350m STEM 1/3 seed 1" in labels and "midtrain Baseline seed 0" in labels, labels
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    assert all("fp32 on cpu" in p and re.search(rf"device memory +{ram:.3f} +fits", p) for p in plans), plans[0]


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_plan_passes_each_notebook_only_what_it_declares(preset):
    "papermill never warns 'Passed unknown parameter': every key passed is declared, every declared preset key is passed."
    presets = load_presets(ROOT / "experiments" / "presets.yaml")
    for r in plan(preset, presets=presets, root=ROOT):
        declared = declared_parameters(ROOT / r["notebook"])
        assert r["declared"] == declared and set(r["params"]) <= set(declared), (r["name"], set(r["params"]) - set(declared))
        resolved = {**presets[preset]["params"], **(presets[preset]["experiments"][r["name"]] or {})}
        missing = [k for k in declared if k in resolved and k not in r["params"]]
        assert not missing, (r["name"], missing)
        assert all(k in declared for k in ("out_dir", "figures_dir", "runs_dir")), (r["name"], "declares where it writes")


def test_skip_key_follows_notebook_code(tmp_path):
    "Editing an experiment's code changes its key (so it re-runs); editing its prose does not."
    shutil.copytree(ROOT / "experiments", tmp_path / "experiments")
    before = {r["name"]: r["hash"] for r in plan("smoke", root=tmp_path)}
    nb = json.loads((tmp_path / "experiments" / "table1_efficiency.ipynb").read_text())
    md = next(c for c in nb["cells"] if c["cell_type"] == "markdown"); md["source"] = ["# retitled"]
    (tmp_path / "experiments" / "table1_efficiency.ipynb").write_text(json.dumps(nb))
    assert {r["name"]: r["hash"] for r in plan("smoke", root=tmp_path)} == before
    code = [c for c in nb["cells"] if c["cell_type"] == "code"][-1]; code["source"] = list(code["source"]) + ["\n# edited"]
    (tmp_path / "experiments" / "table1_efficiency.ipynb").write_text(json.dumps(nb))
    after = {r["name"]: r["hash"] for r in plan("smoke", root=tmp_path)}
    assert [n for n in before if before[n] != after[n]] == ["table1_efficiency"]


def test_set_changes_a_cpu_run_but_never_the_readme_or_committed_figures(tmp_path):
    "`--set` reaches the notebook's parameters (and skip key); a cpu run with overrides writes runs/cpu/figures/, not figures/ or the README."
    from test_faults_reproduce import make_clone, run
    root = make_clone(tmp_path)
    readme = (root / "README.md").read_bytes()
    r = run(root, "--preset", "cpu", "--only", "toy", "--set", "experiments.toy.v=9")
    assert r.returncode == 0, r.stderr
    assert (root / "runs" / "cpu" / "figures" / "tables" / "toy.md").read_text() == "### toy 9 (complete)\n"
    assert not (root / "figures").exists() and (root / "README.md").read_bytes() == readme
    r = run(root, "--preset", "cpu", "--only", "toy")                          # without overrides: the preset's value, a new key
    assert r.returncode == 0 and "toy" in r.stdout and "skipped" not in r.stdout, r.stdout
    assert (root / "figures" / "tables" / "toy.md").read_text() == "### toy 7 (complete)\n"


@pytest.mark.parametrize("nb", sorted((ROOT / "experiments").glob("*.ipynb")), ids=lambda p: p.stem)
def test_parameters_cell_literals_are_the_smoke_preset(nb):
    "Every parameter is a literal (so `papermill --help-notebook` shows it), and the smoke preset's keys hold its values."
    import ast, nbformat
    from stem_nb.runs import experiment_params
    cell = next(c for c in nbformat.read(nb, 4).cells if "parameters" in c.metadata.get("tags", []))
    values = {}
    for node in ast.parse(cell.source).body:
        assert isinstance(node, (ast.Assign, ast.AnnAssign)), (nb.name, ast.unparse(node))
        target = node.targets[0] if isinstance(node, ast.Assign) else node.target
        values[target.id] = ast.literal_eval(node.value)          # raises on a call, a name, an expression
    smoke = experiment_params(nb.stem, "smoke")
    assert {k: values.get(k) for k in smoke} == smoke, nb.name
    assert (values["preset"], values["runs_dir"], values["figures_dir"]) == ("smoke", "runs", "runs/smoke/figures")
    assert values["out_dir"] == f"runs/smoke/{nb.stem}/manual"
