"""The `relatives` experiment through papermill at the smoke preset's size, as `stem-nb reproduce --preset relatives`
runs it: its tables, figure and README section; and the preset itself (cpu's scale, not in cpu)."""
import re, shutil, subprocess, sys, time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stem_nb.reproduce import plan, reproduce, load_presets, figures_dir_for, readme_markers, README_START, README_END

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRESETS = load_presets(ROOT / "experiments" / "presets.yaml")


@pytest.fixture(scope="module")
def rel_run(tmp_path_factory):
    """A scratch checkout whose `relatives` preset has the smoke preset's size (its params and its `relatives` overrides),
    and a README with both results sections; `reproduce('relatives')` there, timed."""
    root = tmp_path_factory.mktemp("relatives")
    shutil.copytree(ROOT / "experiments", root / "experiments")
    pr = yaml.safe_load((root / "experiments" / "presets.yaml").read_text())
    pr["relatives"] = {"description": "smoke-sized", "params": pr["smoke"]["params"],
                       "experiments": {"relatives": pr["smoke"]["experiments"]["relatives"]}}
    (root / "experiments" / "presets.yaml").write_text(yaml.safe_dump(pr, sort_keys=False))
    rs, re_ = readme_markers("relatives")
    (root / "README.md").write_text(f"# clone\n{README_START}\ncpu's\n{README_END}\n## STEM and its relatives\n{rs}\nhand-written\n{re_}\nend\n")
    t0 = time.time()
    status = reproduce("relatives", root=root, progress=False)
    return root, status, time.time() - t0


def test_smoke_sized_relatives_run_writes_its_tables_figure_and_readme_section(rel_run):
    root, status, seconds = rel_run
    assert [s["status"] for s in status] == ["done"], status
    outs = set(status[0]["outputs"])
    want = {"relatives.png"} | {f"tables/relatives{s}.{e}" for s in ("", "_paired", "_ahead", "_gains", "_snr", "_offload") for e in ("md", "csv")}
    assert want <= outs, want - outs
    assert all((root / "figures" / o).is_file() for o in outs)                       # a publishing preset: figures/, not runs/
    readme = (root / "README.md").read_text()
    rs, re_ = readme_markers("relatives")
    cpu_part, rel_part = readme.split(rs)
    assert cpu_part.endswith(f"{README_START}\ncpu's\n{README_END}\n## STEM and its relatives\n") and readme.endswith(f"{re_}\nend\n")
    assert "#### STEM and its relatives at STEM 1/2's FLOPs and at its parameters" in rel_part and "hand-written" not in rel_part
    assert "![relatives](figures/relatives.png)" in rel_part and "| relatives | done |" in rel_part
    print(f"smoke-sized relatives run: {seconds:.0f} s")


def test_the_table_holds_every_variant_within_its_budget(rel_run):
    root, _, _ = rel_run
    variants = PRESETS["smoke"]["experiments"]["relatives"]["variants"]
    t = pd.read_csv(root / "figures" / "tables" / "relatives.csv", dtype=str, keep_default_na=False).set_index("model")
    assert list(t.index) == variants
    for v in variants:
        budget = t.loc[v, "budget"]
        assert budget == (v.split(" ")[-1] if " iso-" in v else "-"), (v, budget)
        gap = t.loc[v, "budget gap"]
        assert gap == "-" if budget == "-" else -1 <= float(gap.rstrip("%")) <= 0, (v, gap)   # met from below, within 1%
        for col in ("val loss", "held-out bpb", "mean gold bpb", "Avg acc."):
            assert re.match(r"^\d+\.\d+", t.loc[v, col]), (v, col, t.loc[v, col])


def test_paired_intervals_and_the_verdict_under_each_budget(rel_run):
    "Every comparison has a value inside its interval; a design is 'ahead' exactly when its interval excludes 0 on its side."
    root, _, _ = rel_run
    tab = root / "figures" / "tables"
    paired = pd.read_csv(tab / "relatives_paired.csv", dtype=str)
    assert set(paired.minus) == {"Baseline", "STEM 1/2"}
    num = lambda c: [float(x) for x in re.findall(r"[-+]\d+\.\d+", c)]
    for _, r in paired.iterrows():
        for m in ("val loss", "held-out bpb", "mean gold bpb", "Avg acc."):
            g, lo, hi = num(r[m])
            assert lo <= g <= hi, (r.variant, r.minus, m, r[m])
    ahead = pd.read_csv(tab / "relatives_ahead.csv", dtype=str)
    assert set(ahead.budget) == {"iso-FLOPs", "iso-params"} and len(ahead) == 8, ahead
    for _, a in ahead.iterrows():
        g, lo, hi = num(a["leader minus closest [95% interval]"])
        resolved = lo > 0 if a.measure == "Avg acc." else hi < 0
        assert (a.ahead == a.leader) == resolved and (a.ahead == "none resolved") == (not resolved), a.to_dict()
    notes = (tab / "relatives.md").read_text()
    for b in ("active FLOPs per token (iso-FLOPs)", "total parameters (iso-params)"):
        assert f"- at STEM 1/2's {b}: val loss: " in notes, b


def test_offload_hit_rates_per_variant_with_tables(rel_run):
    root, _, _ = rel_run
    off = pd.read_csv(root / "figures" / "tables" / "relatives_offload.csv")
    variants = [v for v in PRESETS["smoke"]["experiments"]["relatives"]["variants"] if v != "Baseline"]   # Baseline has no table
    assert list(off.variant.unique()) == variants and set(off.frac) == {0.02, 0.1}
    assert set(off.design) == {"stem", "engram", "pkm"} and off.hit_rate.between(0, 1).all() and (off.lookups > 0).all()
    assert (off.hit_rate_min <= off.hit_rate).all() and (off.hit_rate <= off.hit_rate_max).all()


def test_relatives_preset_is_cpus_350m_runs_and_not_in_cpu():
    "The preset trains at cpu's train_350m (so Baseline and STEM 1/2 are cpu's table_350m runs), 2 seeds, and cpu does not run it."
    rel, cpu = PRESETS["relatives"], PRESETS["cpu"]
    assert "relatives" not in cpu["experiments"] and list(rel["experiments"]) == ["relatives"]
    assert rel["params"]["train_350m"] == cpu["params"]["train_350m"] and rel["params"]["seeds"] == [0, 1]
    assert {k: rel["params"][k] for k in ("eval_subsample", "eval_limit", "n_task_docs")} == \
           {k: cpu["params"][k] for k in ("eval_subsample", "eval_limit", "n_task_docs")}
    from stem_nb.paper import RELATIVES
    assert rel["experiments"]["relatives"]["variants"] == ["Baseline", "STEM 1/2", *RELATIVES]
    assert {"Baseline", "STEM 1/2"} <= set(cpu["experiments"]["table_350m"]["variants"])
    assert figures_dir_for("relatives", ROOT) == ROOT / "figures" and figures_dir_for("relatives", ROOT, ["seeds=[0]"]) != ROOT / "figures"
    (r,) = plan("relatives", presets=PRESETS, root=ROOT)
    assert r["params"]["variants"] == rel["experiments"]["relatives"]["variants"] and r["params"]["preset"] == "relatives"
    assert all(m in (ROOT / "README.md").read_text() for m in readme_markers("relatives"))


def test_relatives_preset_dry_run_prints_the_memory_of_its_runs():
    r = subprocess.run([str(BIN / "stem-nb"), "reproduce", "--preset", "relatives", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train_350m PKM iso-params seed 1" in r.stdout and "train_350m Engram iso-FLOPs seed 0" in r.stdout, r.stdout[-3000:]
