"""Training end to end in real processes: exact resume after SIGKILL, raising `steps`, NaN stop, the CLI.
Tiny model (experiments/configs/debug.yaml, a few seconds per run on one CPU thread)."""
import json, math, os, re, signal, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "debug.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TRAIN = [sys.executable, "-m", "stem_nb.train"]
# the reference run and the killed one: 40 steps, a checkpoint every 10
OVR = ["steps=40", "checkpoint.every=10", "checkpoint.keep=2", "eval_every=20"]


def run(dump, *extra, check=True, timeout=300):
    r = subprocess.run([*TRAIN, str(CONFIG), f"dump_dir={dump}", *OVR, *extra], capture_output=True, text=True,
                       env=ENV, cwd=ROOT, timeout=timeout)
    if check: assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def metrics(dump):
    return [json.loads(l) for l in (Path(dump) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def losses(dump): return {r["step"]: r["loss"] for r in metrics(dump)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run(d)
    return d


def test_reference_run_records(reference):
    rows = metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(k in rows[0] for k in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "flops"))
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["tokens"] == 40 * rows[0]["tokens"] and rows[-1]["flops"] > rows[0]["flops"] > 0
    cks = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert cks == ["0000000030", "0000000040"]                       # keep=2
    assert (reference / "config.yaml").is_file() and (reference / "train.log").is_file()
    assert (reference / "base_config.yaml").read_bytes() == CONFIG.read_bytes()   # the config file as given
    assert (reference / "code" / "commit.txt").is_file() and (reference / "code" / "diff.patch").is_file()
    assert all(r["mfu"] is None and r["hfu"] is None for r in rows)              # no peak FLOP/s is known for a CPU
    rec = json.loads((reference / "data.json").read_text())                # what eval needs: the run's split and tokenizer
    assert rec["tokenizer"]["n_vocab"] == 4096 and rec["tokenizer"]["fingerprint"]
    assert {"shakespeare", "bios"} <= set(rec["sources"])


def test_progress_lines_in_the_log(reference):
    "One line a logged step in train.log: step N/M, the loss of metrics.jsonl, tokens/s and the ETA."
    got = [m for m in map(re.compile(r"step (\d+)/(\d+) loss (\S+) .*?tok/s (\d+) eta (\d+)s").search,
                          (reference / "train.log").read_text().splitlines()) if m]
    assert [int(m[1]) for m in got] == [10, 20, 30, 40] and {int(m[2]) for m in got} == {40}
    assert int(got[-1][5]) == 0 and int(got[0][4]) > 0
    assert float(got[-1][3]) == round(losses(reference)[40], 4)


def test_sigkill_resume_is_bit_identical(reference, tmp_path):
    d = tmp_path / "killed"
    p = subprocess.Popen([*TRAIN, str(CONFIG), f"dump_dir={d}", *OVR], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=ENV, cwd=ROOT)
    mf, killed_at, t0 = d / "metrics.jsonl", None, time.time()
    while time.time() - t0 < 240:
        if p.poll() is not None: break
        if mf.exists():
            steps = [json.loads(l)["step"] for l in mf.read_text().splitlines() if l.endswith("}")]
            if steps and steps[-1] > 10:                                  # past the first checkpoint
                os.kill(p.pid, signal.SIGKILL); killed_at = steps[-1]; break
        time.sleep(0.01)
    p.wait()
    assert killed_at is not None, f"the run ended (rc={p.returncode}) before it could be killed: {p.stderr.read()[-2000:]}"
    assert p.returncode == -signal.SIGKILL and killed_at < 40
    r = run(d)                                                            # the same command resumes
    assert "resumed from" in (d / "train.log").read_text()
    got, ref = losses(d), losses(reference)
    assert sorted(got) == list(range(1, 41))
    assert got == ref, {s: (got[s], ref[s]) for s in ref if got[s] != ref[s]}   # bit-identical per-step losses
    assert json.loads(r.stdout.strip().splitlines()[-1])["resumed_from"].endswith(("0000000010", "0000000020", "0000000030"))


def test_corrupted_checkpoint_falls_back_and_steps_can_be_raised(reference, tmp_path):
    import shutil
    d = tmp_path / "bad"; shutil.copytree(reference, d)
    f = d / "checkpoints" / "0000000040" / "backbone" / "__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-10])                               # truncated: the manifest's size differs
    r = run(d, "steps=45")
    log = (d / "train.log").read_text()
    assert "__0_0.distcp is truncated" in log and "resumed from" in log and "0000000030" in log
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["step"] == 45 and s["resumed_from"].endswith("0000000030")
    assert [r["step"] for r in metrics(d)] == list(range(1, 46))
    assert losses(d)[31] == losses(reference)[31]                    # step 31 starts from checkpoint 30 in both runs
    assert sorted(p.name for p in (d / "checkpoints").iterdir() if not p.name.startswith(".")) == ["0000000040", "0000000045"]


def test_nan_stops_and_keeps_checkpoint(reference, tmp_path):
    import shutil
    d = tmp_path / "nan"; shutil.copytree(reference, d)
    r = run(d, "steps=50", "optim.lr=1e30", "optim.weight_decay=0", "optim.warmup=0", "optim.clip=0", check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "not finite" in r.stderr and "0000000040" in r.stderr and "were checked together" in r.stderr
    assert "not finite" in (d / "train.log").read_text()
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["0000000030", "0000000040"]
    import torch
    from stem_nb.restore import load_model
    m = load_model(d)                                                 # the newest checkpoint is the last finite one
    assert all(torch.isfinite(p).all() for p in m.parameters())
    bad = [r for r in metrics(d) if not math.isfinite(r["loss"])]
    assert bad == [] and max(r["step"] for r in metrics(d)) < 50      # no NaN row, and the run stopped before step 50


def test_bad_key_is_named(tmp_path, capsys):
    from stem_nb.train import cli
    assert cli([str(CONFIG), f"dump_dir={tmp_path}", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_stem_nb_train_cli(tmp_path, capsys):
    from stem_nb.cli import main                                     # what the `stem-nb` console script runs
    assert main(["train", str(CONFIG), f"dump_dir={tmp_path}", "steps=3", "checkpoint.every=0", "progress=none"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["step"] == 3 and s["checkpoint"].endswith("0000000003") and math.isfinite(s["loss"])


def test_resume_with_another_model_is_refused(reference, tmp_path, capsys):
    import shutil
    from stem_nb.train import cli
    d = tmp_path / "other"; shutil.copytree(reference, d)
    assert cli([str(CONFIG), f"dump_dir={d}", "model.dim=32", "progress=none"]) == 2
    assert "model.dim=32 differs from 64" in capsys.readouterr().err
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["0000000030", "0000000040"]
