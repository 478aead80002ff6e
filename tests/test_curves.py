"Curves, not points: the 350M family keeps a checkpoint every `checkpoint.every` steps, and Figure 9 scores each one."
import inspect, json, shutil
from pathlib import Path

import pandas as pd
import pytest

from checks import check_png, check_table
from stem_nb.checkpoint import CKPT_DIR, list_checkpoints
from stem_nb.reproduce import load_presets, reproduce
from stem_nb.runs import eval_cached, experiment_params, load_metrics

ROOT = Path(__file__).resolve().parents[1]
NAME = "fig9_bpb_vs_flops"


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_presets_keep_every_checkpoint_of_the_350m_family_only(preset):
    "train_350m saves every `every` steps and keeps them all (at least 2 per run); the other blocks keep one, as before."
    p = experiment_params(NAME, preset, load_presets(ROOT / "experiments" / "presets.yaml"))
    t = p["train_350m"]
    ck = t["checkpoint"]
    assert ck["every"] > 0 and ck["keep"] == 0, ck
    assert t["steps"] % ck["every"] == 0 and t["steps"] // ck["every"] >= 2, (t["steps"], ck)
    for blk in ("train_1b", "train_knowledge"):                        # their runs are not curves: no extra disk
        assert p[blk]["checkpoint"]["keep"] >= 1, (blk, p[blk]["checkpoint"])


@pytest.fixture(scope="module")
def fig9(tmp_path_factory):
    "Figure 9 under the smoke preset, through the driver, in a scratch copy of experiments/ (its runs under root/runs)."
    root = tmp_path_factory.mktemp("curves")
    shutil.copytree(ROOT / "experiments", root / "experiments")
    (status,) = reproduce("smoke", only=[NAME], root=root, progress=False)
    return root, status


def test_fig9_smoke_draws_one_curve_per_variant(fig9):
    root, status = fig9
    assert status["status"] == "done", status
    p = experiment_params(NAME, "smoke")
    t = p["train_350m"]
    steps = list(range(t["checkpoint"]["every"], t["steps"] + 1, t["checkpoint"]["every"]))
    df = pd.read_csv(next((root / "runs" / "smoke" / NAME).glob("*/bpb_vs_flops.csv")))
    assert sorted(df.variant.unique()) == sorted(p["variants"]) and sorted(df.seed.unique()) == p["seeds"]
    for (v, sd), d in df.groupby(["variant", "seed"]):
        assert d.step.tolist() == steps, (v, sd, d.step.tolist())
        assert d.train_flops.is_monotonic_increasing and d.tokens.tolist() == [s * t["data"]["batch_size"] * t["data"]["seq_len"] for s in steps]
    assert df.avg_acc.between(0, 100).all() and (df.mean_gold_bpb > 0).all()
    assert 25 < df.chance_acc.iloc[0] < 50 and df.docs_min.min() == df.docs_max.max() == p["eval_subsample"]["default"]
    figs = root / "runs" / "smoke" / "figures"
    table = pd.read_csv(figs / "tables" / f"{NAME}.csv")
    assert len(table) == len(p["variants"]) * len(steps) and {"avg_acc_min", "avg_acc_max", "bpb_min", "bpb_max", "seeds"} <= set(table)
    md = (figs / "tables" / f"{NAME}.md").read_text()
    assert "min/max: the seeds' range" in md and f"docs per task: {p['eval_subsample']['default']} " in md, md
    assert (figs / f"{NAME}.png").stat().st_size > 10_000
    run = root / "runs" / "smoke" / NAME / status["hash"]               # what tests/test_reproduce.py checks of the others
    assert status["outputs"] and all((figs / o).read_bytes() == (run / "figures" / o).read_bytes() for o in status["outputs"])
    for o in status["outputs"]:
        if o.endswith(".png"): check_png(figs / o)
        if o.endswith(".md"): check_table(figs / o)


def test_smoke_runs_keep_each_checkpoint_with_its_flops(fig9):
    "Each run keeps steps 4 and 8; metrics.jsonl has their FLOPs, linear in the step, ending at the summary's."
    root, _ = fig9
    t = experiment_params(NAME, "smoke")["train_350m"]
    dumps = sorted(d for d in (root / "runs" / "train").iterdir() if (d / "summary.json").exists())
    assert dumps
    for d in dumps:
        steps = [int(c.name) for c in list_checkpoints(d / CKPT_DIR)]
        assert steps == list(range(t["checkpoint"]["every"], t["steps"] + 1, t["checkpoint"]["every"])), (d, steps)
        m = load_metrics(d).drop_duplicates("step", keep="last").set_index("step")
        s = json.loads((d / "summary.json").read_text())
        assert m.loc[steps[-1], "flops"] == s["flops"] and m.loc[steps[0], "flops"] * len(steps) == pytest.approx(s["flops"])


@pytest.mark.skipif("step" not in inspect.signature(eval_cached).parameters, reason="eval_cached takes no step")
def test_eval_at_a_step_scores_that_checkpoint(fig9):
    "An earlier checkpoint scores differently from the newest (other weights), and each is cached on its own."
    root, _ = fig9
    d = next(d for d in sorted((root / "runs" / "train").iterdir()) if (d / "summary.json").exists())
    kw = dict(tasks=["piqa"], limit=None, task_dir=None, subsample=2, seed=0)
    first, last = eval_cached(d, step=4, **kw), eval_cached(d, step=None, **kw)
    assert first["gold_bpb"]["piqa"]["gold_bpb"] != last["gold_bpb"]["piqa"]["gold_bpb"]
    assert eval_cached(d, step=4, **kw) == first
