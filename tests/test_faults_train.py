"""Faults a user meets with `stem-nb train`, run from the command line as a user would (issue 12): two trainers on one
dump dir, `checkpoint.resume=false` on an existing run, Ctrl-C, a rejected resume, unloadable checkpoints, a bad
`stem_layers`. Each test asserts the message, the exit code, and that nothing written before is lost or changed
(sha256 of every file before and after). Tiny model: experiments/configs/debug.yaml, one CPU thread."""
import hashlib, json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "debug.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TRAIN = [sys.executable, "-m", "stem_nb.train", str(CONFIG)]
OVR = ["steps=10", "checkpoint.every=5", "checkpoint.keep=0", "eval_every=0", "log_every=5", "progress=lines"]


def cmd(dump, *extra): return [*TRAIN, f"dump_dir={dump}", *OVR, *extra]


def run(dump, *extra, timeout=300):
    return subprocess.run(cmd(dump, *extra), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def digest(d, skip=(".lock",)) -> dict:
    "{relative path: sha256} of every file under `d` (the lock file holds the newest trainer's pid: skipped)."
    d = Path(d)
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name not in skip}


def steps_of(dump): return [json.loads(l)["step"] for l in (Path(dump) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred(): return True
        if proc.poll() is not None: return False
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    "A finished 10-step run with checkpoints 5 and 10, copied by each test that changes it."
    d = tmp_path_factory.mktemp("done") / "run"
    r = run(d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def copy(src, tmp_path, name="run"):
    d = tmp_path / name; shutil.copytree(src, d); return d


def test_second_trainer_refused_at_once(tmp_path):
    d = tmp_path / "run"
    a = subprocess.Popen(cmd(d, "steps=100000", "checkpoint.every=0", "checkpoint.at_end=false"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        assert wait_for(lambda: (d / "data.json").exists() and (d / "metrics.jsonl").exists()
                        and (d / "metrics.jsonl").stat().st_size > 0, a), a.stderr.read()[-3000:] if a.poll() is not None else "A too slow"
        before = digest(d, skip=(".lock", "metrics.jsonl", "train.log"))     # A appends to these two
        t0 = time.time()
        subprocess.run([sys.executable, "-c", "import stem_nb.train"], env=ENV, cwd=ROOT, check=True)
        startup = time.time() - t0                                         # what "at once" can mean on this machine now
        t0 = time.time()
        b = run(d, timeout=120)
        took = time.time() - t0
        assert b.returncode == 2, b.stderr[-3000:]
        assert f"is in use by another trainer (pid {a.pid}" in b.stderr and "Traceback" not in b.stderr
        assert took < 2 * startup + 5, f"B took {took:.1f}s to refuse (startup {startup:.1f}s): it must not wait for the lock"
        assert (d / ".lock").read_text().strip() == str(a.pid)
        assert digest(d, skip=(".lock", "metrics.jsonl", "train.log")) == before
        assert a.poll() is None, "the first trainer died when the second started"
        n = steps_of(d)[-1]
        assert wait_for(lambda: steps_of(d)[-1] > n, a), "the first trainer stopped making progress"
    finally:
        a.send_signal(signal.SIGINT); a.wait(timeout=60)
    rows = steps_of(d)
    assert rows == list(range(1, len(rows) + 1))                         # A's metrics lost no row


def test_resume_false_moves_the_old_run_aside(finished, tmp_path):
    d = copy(finished, tmp_path)
    before = digest(d)
    r = run(d, "steps=4", "checkpoint.resume=false")
    assert r.returncode == 0, r.stderr[-3000:]
    old = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(old) == 1
    assert f"checkpoint.resume=false: moved the previous run in {d} aside to {old[0]}" in r.stderr
    assert digest(old[0]) == before                                     # nothing lost, nothing changed
    assert steps_of(d) == [1, 2, 3, 4]
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["0000000004"]   # not pruned by the old 0000000010
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["resumed_from"] is None and s["step"] == 4


def test_ctrl_c_exits_130_and_resumes(tmp_path):
    d = tmp_path / "run"
    p = subprocess.Popen(cmd(d, "steps=100000", "checkpoint.every=5"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=ENV, cwd=ROOT)
    ok = wait_for(lambda: (d / "checkpoints" / "0000000010").is_dir(), p)
    assert ok, p.stderr.read()[-3000:] if p.poll() is not None else "no checkpoint 10 in time"
    ck5 = digest(d / "checkpoints" / "0000000005")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-3000:]
    assert "interrupted at step" in err and "re-run the same command to resume" in err and "Traceback" not in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert step >= 10
    assert digest(d / "checkpoints" / "0000000005") == ck5                # checkpoints written before are untouched
    assert f"STOPPED: interrupted at step {step}" in (d / "train.log").read_text()
    newest = sorted(x.name for x in (d / "checkpoints").iterdir() if not x.name.startswith("."))[-1]
    r = run(d, f"steps={int(newest) + 2}")                               # the same command (steps raised to end soon) resumes
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["resumed_from"].endswith(newest)
    assert steps_of(d) == list(range(1, int(newest) + 3))


def test_rejected_resume_changes_nothing(finished, tmp_path):
    d = copy(finished, tmp_path)
    before = digest(d)
    r = run(d, "model.dim=32")                                           # another model than the checkpoints hold
    assert r.returncode == 2, r.stderr[-3000:]
    assert "model.dim=32 differs from 64" in r.stderr and "checkpoint.resume=false to move the old run aside" in r.stderr
    assert "Traceback" not in r.stderr
    assert digest(d) == before                                           # config.yaml included: not overwritten
    r = run(d, "steps=7")                                                # below the checkpoint's step
    assert r.returncode == 2 and "steps=7 is below the step 10" in r.stderr, r.stderr[-3000:]
    assert digest(d) == before


def test_unloadable_checkpoints_are_kept(finished, tmp_path):
    d = copy(finished, tmp_path)
    for c in (d / "checkpoints").iterdir():
        f = c / "backbone" / "__0_0.distcp"; f.write_bytes(f.read_bytes()[:-10])
    before = digest(d)
    log0 = (d / "train.log").read_text()
    r = run(d, "steps=12")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "none of the 2 checkpoints" in r.stderr and "refusing to start over on top of them" in r.stderr
    assert "checkpoint.resume=false to move the old run aside" in r.stderr and "Traceback" not in r.stderr
    after = digest(d)
    assert {k: v for k, v in after.items() if k != "train.log"} == {k: v for k, v in before.items() if k != "train.log"}
    log = (d / "train.log").read_text()
    assert log.startswith(log0) and "is truncated" in log[len(log0):]   # the log only gained the reasons


def test_single_int_stem_layers_is_a_clear_error(tmp_path):
    d = tmp_path / "run"
    r = run(d, "model.stem_layers=1")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "stem_layers" in r.stderr and "not iterable" not in r.stderr and "Traceback" not in r.stderr
    assert not d.exists()                                                # rejected before anything was written
