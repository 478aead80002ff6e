"Fast tests of stem_nb.paper's and stem_nb.runs' pure functions: the family table, the paper presets' recipe, mean ± std; no training."
import json, math, os, re
from pathlib import Path

import numpy as np, pandas as pd, pytest, yaml

os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
from stem_nb.config import ConfigError
from stem_nb.paper import (TASKS8, PAPER_350M, PAPER_1B, PAPER_TOKENS, PAPER_GLOBAL_BATCH, PAPER_SEQ_LEN, family_table,
                           family_gains, compare_gain, mean_pm)
from stem_nb.runs import paper_recipe, format_recipe, check_recipe_inputs, subsample_size, train_overrides

ROOT = Path(__file__).resolve().parents[1]
PRESETS = yaml.safe_load((ROOT / "experiments" / "presets.yaml").read_text())


def family(gain=0.05, seeds=(0, 1), se=0.01, n=500, per_doc=True):
    "A synthetic family: Baseline at 0.40 on every task, STEM 1/3 `gain` higher on every task (the first docs right)."
    rows = []
    for v, fl, g in (("Baseline", 4.0, 0.0), ("STEM 1/3", 3.0, gain)):
        for sd in seeds:
            r = dict(variant=v, seed=sd, total_M=2.0, active_M=fl / 2, MFLOPs=fl, val_loss=3.0)
            for i, t in enumerate(TASKS8):
                k = round((0.40 + g + 0.002 * sd) * n)
                r[f"acc:{t}"], r[f"se:{t}"], r[f"n:{t}"], r[f"bpb:{t}"] = k / n, se, n, 1.5 + i / 10
                if per_doc: r[f"doc:{t}"] = {"id": list(range(n)), "v": [1.0] * k + [0.0] * (n - k)}
            rows.append(r)
    return pd.DataFrame(rows)


def test_family_table_avg_roi_and_cells():
    t = family_table(family(), PAPER_350M)
    avg_b, avg_s = 40.1, 45.1                                     # percent; seeds differ by 0.2 point
    assert float(t.loc[0, "Avg"].split(" ± ")[0]) == pytest.approx(avg_b, abs=0.006)
    assert float(t.loc[1, "Avg"].split(" ± ")[0]) == pytest.approx(avg_s, abs=0.006)
    assert t.loc[1, "ROI"] == pytest.approx((avg_s / 3.0) / (avg_b / 4.0), abs=1e-3)
    assert t.loc[0, "ROI"] == 1.0
    assert t.loc[1, "paper Avg"] == 50.90 and t.loc[1, "paper ROI"] == 1.08
    cell = t.loc[1, "arc_easy"]                                   # acc ± s.e. over docs (n) [paper]
    x = np.array([1.0] * 225 + [0.5] + [0.0] * 274)                # the two seeds' per-doc scores averaged
    assert cell == f"45.1 ± {100 * x.std(ddof=1) / math.sqrt(500):.1f} (n=500) [paper 63.01]", cell
    assert family_table(family(per_doc=False), PAPER_350M).loc[1, "arc_easy"] == "45.1 ± 1.0 (n=500) [paper 63.01]"  # lm-eval's s.e.
    assert t.loc[0, "mean gold bpb"] == "1.850 ± 0.000"
    assert t.loc[0, "gold bpb winogrande"] == "2.200 ± 0.000"


def test_family_table_missing_task_gives_reason_and_no_avg():
    df = family().astype({"acc:hellaswag": object})
    df.loc[df.variant == "Baseline", "acc:hellaswag"] = "n/a: no offline source"
    t = family_table(df, PAPER_1B)
    assert t.loc[0, "hellaswag"] == "n/a: no offline source"
    assert t.loc[0, "Avg"] == "n/a" and t.loc[1, "ROI"] == "n/a"    # no baseline Avg: no ROI for anyone


def test_gains_agree_and_disagree():
    g = family_gains(family(gain=0.05))["STEM 1/3"]                # 25 more docs right of 500 on every task, paired
    assert g["value"] == pytest.approx(5.0, abs=1e-9) and 0 < g["se"] < 1.0 and 3.5 < g["lo"] < 5.0 < g["hi"] < 6.5
    assert compare_gain("STEM 1/3", 1.18, g).startswith("STEM 1/3: agrees in sign")
    g0 = family_gains(family(gain=0.0))["STEM 1/3"]                # the same docs right: only the seeds' one doc differs
    assert abs(g0["value"]) < 1e-9 and g0["hi"] < 0.93
    s = compare_gain("STEM-dagger", 50.65 - 49.72, g0)
    assert s.startswith("STEM-dagger: disagrees (paper +0.93") and "no measurable difference" in s, s
    ci = lambda g, lo, hi: dict(value=g, lo=lo, hi=hi)
    assert compare_gain("x", 0.5, ci(0.1, -0.9, 1.1)).startswith("x: not resolved at our scale")   # the interval holds 0 and 0.5
    assert compare_gain("x", 1.0, ci(-5.0, -6.0, -4.0)).endswith("opposite sign)")
    assert family_gains(family(per_doc=False)) == {"STEM 1/3": None}


def test_mean_pm():
    assert mean_pm([0.25, 0.75]) == f"0.500 ± {np.std([0.25, 0.75], ddof=1):.3f}"
    assert mean_pm([1.23456], digits=2) == "1.23"
    assert mean_pm(["n/a: no offline source", 0.3]) == "n/a: no offline source"
    assert mean_pm([]) == "n/a"


@pytest.mark.parametrize("name", ["paper-350m", "paper-1b"])
def test_paper_recipe_tokens_match_the_paper(name):
    r = paper_recipe(PRESETS[name], name)
    assert set(r["blocks"]) == set(PAPER_TOKENS[name])
    for blk, b in r["blocks"].items():
        assert b["global_batch"] == PAPER_GLOBAL_BATCH and b["seq_len"] == PAPER_SEQ_LEN
        assert b["tokens"] == b["steps"] * PAPER_GLOBAL_BATCH * PAPER_SEQ_LEN
        assert abs(b["tokens"] / PAPER_TOKENS[name][blk] - 1) < 0.01, (blk, b["tokens"])
        assert (b["warmup"], b["lr_min_ratio"], b["betas"], b["weight_decay"]) == (2000, 0.1, (0.9, 0.95), 0.1)
        assert b["tokenizer"] and Path(b["tokenizer"]).name == "tokenizer.model"
        assert b["root_dir"] == "data" and b["inputs"][:len(b["sources"])] == [f"data/{s}" for s in b["sources"]]
    lr = {"paper-350m": 2e-3, "paper-1b": 4e-4}[name]
    assert all(b["lr"] == lr for b in r["blocks"].values())
    txt = format_recipe(r)
    assert "= 512 sequences x 4096 tokens = 2,097,152 tokens/step" in txt


def test_midtrain_mixture_is_65_5_30():
    b = paper_recipe(PRESETS["paper-1b"], "paper-1b")["blocks"]["midtrain"]
    assert b["sources"] == {"fineweb_edu": 0.65, "math": 0.05, "code": 0.30}
    assert b["init_from"] and b["tokenizer"] == PRESETS["paper-1b"]["params"]["train_1b"]["data"]["tokenizer"]


@pytest.mark.parametrize("name", ["paper-350m", "paper-1b"])
def test_launch_lines_give_the_world_size(name):
    pr = PRESETS[name]
    for cmd in pr["launch"]:
        m = re.search(r"--nodes (\d+) --gpus-per-node (\d+)", cmd) or re.search(r"--nnodes (\d+) --nproc-per-node (\d+)", cmd)
        assert m, cmd
        assert int(m[1]) * int(m[2]) == pr["world_size"], cmd


def test_missing_inputs_fail_fast_with_the_command(tmp_path):
    with pytest.raises(ConfigError) as e:
        check_recipe_inputs(PRESETS["paper-1b"], "paper-1b", root=tmp_path)
    msg = str(e.value)
    assert "data/fineweb_edu is missing: run `stem-nb prepare fineweb_edu data/fineweb_edu`" in msg
    assert "data/tokenizers/llama3/original/tokenizer.model is missing: run `huggingface-cli download meta-llama/Llama-3.2-1B" in msg
    assert "data/math is missing" in msg and "data/code is missing" in msg


def test_cpu_preset_runs_every_variant_it_asks_for():
    for name in ("smoke", "cpu"):
        p = PRESETS[name]["params"]
        for v in PRESETS[name]["experiments"].get("table_350m", {}).get("variants", []):
            train_overrides(p["train_350m"], v, 0)                 # raises on an unknown variant


def _declared(nb: Path) -> set:
    from papermill.iorw import load_notebook_node
    from papermill.inspection import _infer_parameters            # the parser papermill's "unknown parameter" check uses
    return {p.name for p in _infer_parameters(load_notebook_node(str(nb)), name="python3", language="python")}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_notebooks_declare_every_parameter_the_driver_passes(preset):
    pr = PRESETS[preset]
    for name, over in pr["experiments"].items():
        nb = ROOT / "experiments" / f"{name}.ipynb"
        assert nb.exists(), nb
        passed = set(pr.get("params", {})) | set(over or {}) | {"preset", "out_dir", "figures_dir", "runs_dir"}
        missing = passed - _declared(nb)
        assert not missing, f"{nb.name} does not declare {sorted(missing)} (preset {preset})"


def test_notebook_defaults_are_the_smoke_preset():
    "A notebook opened in JupyterLab runs with the smoke preset's values: its parameters cell holds them, never `{}`."
    import nbformat
    from stem_nb.runs import experiment_params
    for nb in sorted((ROOT / "experiments").glob("*.ipynb")):
        cell = next(c for c in nbformat.read(nb, 4).cells if "parameters" in c.metadata.get("tags", []))
        assert "= {}" not in cell.source, nb.name
        assert nb.stem in PRESETS["smoke"]["experiments"], f"{nb.name} is not in the smoke preset"
        ns: dict = {}
        exec(cell.source, ns)
        want = experiment_params(nb.stem, "smoke", PRESETS)
        assert ns.get("preset") == "smoke", nb.name
        assert {k: ns[k] for k in want if k in ns} == {k: want[k] for k in want if k in ns}, nb.name


@pytest.mark.parametrize("name", ["paper-350m", "paper-1b"])
def test_paper_blocks_are_valid_train_args(name):
    "Every paper training block resolves to `TrainArgs` (the run the recipe prints is the run `train` would start)."
    from stem_nb.runs import train_key, midtrain_block, _merged_block
    params = PRESETS[name]["params"]
    for blk in PAPER_TOKENS[name]:
        args, _ = train_key(train_overrides(_merged_block(params, blk), "STEM 1/3", 0))
        r = paper_recipe(PRESETS[name], name)["blocks"][blk]
        assert (args.steps, args.data.seq_len, args.data.batch_size, args.grad_accum) == (r["steps"], r["seq_len"], r["per_gpu_batch"], r["grad_accum"])
        assert args.data.root_dir == "data" and args.data.tokenizer == r["tokenizer"] and args.optim.lr == r["lr"]


def test_no_preset_inherits_a_smoke_only_override():
    """Experiment notebooks default to the smoke preset's values, and the driver passes only what a preset sets: so a key
    that smoke sets for an experiment must be set by every other preset running that experiment (the cpu table_350m
    once ran smoke's 3 variants instead of 7)."""
    import yaml
    from stem_nb.files import repo_root
    presets = yaml.safe_load((repo_root() / "experiments" / "presets.yaml").read_text())
    smoke = presets["smoke"]["experiments"]
    missing = [f"{name}: {exp}.{k}" for name, pr in presets.items() if name != "smoke"
               for exp, ov in (pr.get("experiments") or {}).items()
               for k in (smoke.get(exp) or {}) if k not in (ov or {}) and k not in (pr.get("params") or {})]
    assert not missing, f"presets inherit smoke-only values: {missing}"
