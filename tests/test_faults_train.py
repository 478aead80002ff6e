"""Faults a user meets with `stem-nb train`, run from the command line as a user would: two trainers on one
dump dir, `checkpoint.resume=false` on an existing run, Ctrl-C, a rejected resume, unloadable checkpoints, a bad
`stem_layers`; a corrupt file of any kind in the newest checkpoint, a malformed `checkpoint.init_from`, a dump dir
that must not be moved aside (the working directory, the checkout, $HOME, /), a read-only dump dir, a full disk while
metrics.jsonl is cut back at resume. Each test asserts the message, the exit code, and that nothing written before
is lost or changed (sha256 of every file before and after). Tiny model: experiments/configs/debug.yaml, one CPU
thread."""
import contextlib, errno, hashlib, json, os, random, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "debug.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TRAIN = [sys.executable, "-m", "stem_nb.train", str(CONFIG)]
OVR = ["steps=10", "checkpoint.every=5", "checkpoint.keep=0", "eval_every=0", "log_every=5", "progress=lines"]


def cmd(dump, *extra): return [*TRAIN, f"dump_dir={dump}", *OVR, *extra]


def run(dump, *extra, timeout=300, cwd=ROOT, env=ENV):
    return subprocess.run(cmd(dump, *extra), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


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


def one_message(err: str, *wanted: str):
    "stderr holds one `stem-nb train:` line, with every `wanted` piece, and no traceback."
    lines = [l for l in err.splitlines() if l.startswith("stem-nb train:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for w in wanted: assert w in lines[0], (w, lines[0])
    return lines[0]


# -- a corrupt file in the newest checkpoint: verified before anything of it is used, the previous one resumes --------

def _flip(f: Path, at: int):
    b = bytearray(f.read_bytes()); b[at] ^= 0x01; f.write_bytes(bytes(b))

def _truncate(f: Path): f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

def _middle(f: Path) -> int: return f.stat().st_size // 2

CORRUPTIONS = {   # file of the newest checkpoint -> (how, where a flip goes)
    "model_args.json truncated": ("model_args.json", "truncate", None),
    "model_args.json dim 64->65": ("model_args.json", "flip", lambda f: f.read_text().index('"dim": 64') + 8),
    "config.yaml flipped": ("config.yaml", "flip", _middle),
    "train_state truncated": ("train_state_00000.json", "truncate", None),
    "MANIFEST.json truncated": ("MANIFEST.json", "truncate", None),
    "MANIFEST.json sha flipped": ("MANIFEST.json", "flip", lambda f: f.read_text().index('"sha256": "') + 20),
    "MANIFEST.json key flipped": ("MANIFEST.json", "flip", lambda f: f.read_text().index('"files"') + 3),   # "fimes"
    "table slice flipped": ("stem_tables/slice-000-of-001.safetensors", "flip", _middle),
    "DCP .metadata flipped": ("backbone/.metadata", "flip", _middle),
    "DCP data flipped": ("backbone/__0_0.distcp", "flip", _middle),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_resumes_from_the_previous(finished, tmp_path, case):
    rel, how, at = CORRUPTIONS[case]
    d = copy(finished, tmp_path)
    ck10, f = d / "checkpoints" / "0000000010", d / "checkpoints" / "0000000010" / rel
    _truncate(f) if how == "truncate" else _flip(f, at(f))
    before, rows, log0 = digest(d), (d / "metrics.jsonl").read_text().splitlines(), (d / "train.log").read_text()
    r = run(d, "steps=5")                                              # the previous checkpoint's step: nothing to train
    assert r.returncode == 0, r.stderr[-3000:]
    warn = [l for l in r.stderr.splitlines() if l.startswith(f"stem-nb train: WARNING: skipping checkpoint {ck10}: ")]
    assert len(warn) == 1 and str(f) in warn[0], r.stderr[-3000:]     # names the checkpoint and the corrupt file
    assert "model.dim" not in r.stderr and "resume=false" not in r.stderr and "Traceback" not in r.stderr   # no wrong advice
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["resumed_from"] == str(d / "checkpoints" / "0000000005") and s["step"] == 5
    log = (d / "train.log").read_text()
    assert log.startswith(log0) and f"WARNING: skipping checkpoint {ck10}" in log[len(log0):]
    assert (d / "metrics.jsonl").read_text().splitlines() == rows[:5]  # cut back to the resumed step, rows kept as they were
    assert "steps: 5" in (d / "config.yaml").read_text()               # the accepted run's config
    after = digest(d)
    rewritten = ("metrics.jsonl", "train.log", "config.yaml", "machine.json")   # machine.json: one entry appended per start
    # every file written before is as it was (new files may join: code/step-N/ records a resume under other code)
    assert {k: after.get(k) for k in before if k not in rewritten} == {k: v for k, v in before.items() if k not in rewritten}


# -- checkpoint.init_from pointing at something that is not a model -----------------------------------------------------

@pytest.fixture(scope="module")
def consolidated(finished, tmp_path_factory):
    "The finished run's newest checkpoint as one consolidated safetensors file."
    from stem_nb.restore import export_consolidated
    return export_consolidated(finished / "checkpoints" / "0000000010", tmp_path_factory.mktemp("st") / "model.safetensors")


def _bad_init(kind: str, src: Path, consolidated: Path) -> Path:
    "A malformed `init_from` of `kind`, made under `src`."
    src.mkdir()
    if kind == "garbage bytes": (f := src / "weights.pt").write_bytes(random.Random(0).randbytes(4096))
    elif kind == "a JSON file": (f := src / "model.json").write_text(json.dumps({"model_args": {"dim": 64}, "model": {}}))
    elif kind == "a truncated export": (f := src / "model.safetensors").write_bytes(consolidated.read_bytes()[: consolidated.stat().st_size // 2])
    elif kind == "a folder that is no checkpoint": (f := src / "notes").mkdir(); (f / "README.txt").write_text("not a checkpoint\n")
    elif kind == "weights that do not fit the model args":
        from stem_nb.tensor_files import load_tensor_file, save_tensor_file
        obj = load_tensor_file(consolidated); obj["model_args"]["n_layers"] = 2
        save_tensor_file(f := src / "model.safetensors", obj)
    else: raise ValueError(kind)
    return f


@pytest.mark.parametrize("kind", ["garbage bytes", "a JSON file", "a truncated export", "a folder that is no checkpoint",
                                  "weights that do not fit the model args"])
def test_malformed_init_from_is_one_message(consolidated, tmp_path, kind):
    f = _bad_init(kind, tmp_path / "src", consolidated)
    before = digest(tmp_path / "src")
    d = tmp_path / "run"
    r = run(d, "steps=2", f"checkpoint.init_from={f}")
    assert r.returncode == 2, r.stderr[-3000:]
    one_message(r.stderr, f"checkpoint.init_from={f}")
    assert not d.exists()                                              # refused before the dump dir was created
    assert digest(tmp_path / "src") == before


# -- checkpoint.resume=false on a folder that must never be moved aside ---------------------------------------------------

def _small_run(d: Path) -> Path:
    "A folder that looks like a run (has_run is true), without training one."
    (d / "checkpoints" / "0000000001").mkdir(parents=True)
    (d / "checkpoints" / "0000000001" / "MANIFEST.json").write_text("{}")
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    return d


@pytest.mark.parametrize("where", ["the working directory", "a parent of the working directory", "the checkout",
                                   "the home directory", "/"])
def test_resume_false_never_moves_protected_dirs(tmp_path, where):
    base = _small_run(tmp_path / "place")
    cwd, env, dump, want = base, ENV, ".", "dump_dir=. is the working directory: checkpoint.resume=false would move it aside"
    if where == "a parent of the working directory":
        cwd, dump, want = base / "checkpoints", "..", f"dump_dir=.. is a parent of the working directory ({base / 'checkpoints'})"
    elif where == "the checkout":                                      # a checkout of its own: the real one is never risked
        (base / "experiments").mkdir(); shutil.copy(ROOT / "experiments" / "presets.yaml", base / "experiments")
        cwd, env, dump = tmp_path, {**ENV, "STEM_NB_ROOT": str(base)}, str(base)
        want = f"dump_dir={base} is the stem-nb checkout:"
    elif where == "the home directory":
        cwd, env, dump, want = tmp_path, {**ENV, "HOME": str(base)}, str(base), f"dump_dir={base} is the home directory:"
    elif where == "/":
        from stem_nb.run_dir import protected_dir
        assert protected_dir("/"), "the guard is off: not running a trainer on /"
        cwd, dump, want = tmp_path, "/", f"dump_dir=/ is a parent of the working directory ({tmp_path})"
    watched = base if where != "/" else tmp_path
    before, listing = digest(watched, skip=()), sorted(p.name for p in watched.parent.iterdir())
    r = run(dump, "steps=2", "checkpoint.resume=false", cwd=cwd, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    one_message(r.stderr, "DumpDirError", want, "is never moved", "e.g. runs/NAME")
    assert digest(watched, skip=()) == before                          # not even a lock file was written
    assert sorted(p.name for p in watched.parent.iterdir()) == listing  # nothing moved aside
    if where == "/": assert not Path("/.lock").exists() and not Path("/metrics.jsonl").exists()


# -- a read-only dump dir -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def read_only(d: Path):
    "Make the folder `d` read-only: chmod 0555 (not root), else a read-only bind mount of it on itself (root can write "
    "through permission bits); yields how, or None when this machine allows neither."
    if os.geteuid() != 0:
        d.chmod(0o555)
        try: yield "chmod 0555"
        finally: d.chmod(0o755)
        return
    if subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True).returncode != 0:
        yield None; return
    try:
        ok = subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], capture_output=True).returncode == 0
        yield "read-only bind mount" if ok else None
    finally: subprocess.run(["umount", str(d)], capture_output=True)


def simulate_read_only(monkeypatch, d: Path):
    "In this process, every write under `d` fails with EROFS (os.open for writing, os.mkdir, os.access W_OK)."
    root, real_open, real_mkdir, real_access = str(d), os.open, os.mkdir, os.access
    def under(p): return os.path.abspath(os.fspath(p)).startswith(root)
    def ro(p): return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(p))
    def open_(p, flags, *a, **k):
        if under(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT): raise ro(p)
        return real_open(p, flags, *a, **k)
    def mkdir_(p, *a, **k):
        if under(p): raise ro(p)
        return real_mkdir(p, *a, **k)
    monkeypatch.setattr(os, "open", open_); monkeypatch.setattr(os, "mkdir", mkdir_)
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if under(p) and m & os.W_OK else real_access(p, m, *a, **k))


@pytest.mark.parametrize("target", ["the run", "a new dump dir inside"])
def test_read_only_dump_dir_is_refused_before_training(finished, tmp_path, monkeypatch, capsys, target):
    ro = copy(finished, tmp_path)
    d = ro if target == "the run" else ro / "new"
    before = digest(ro, skip=())
    with read_only(ro) as how:
        if how is not None:                                            # a real read-only folder, a real trainer
            r = run(d, "steps=12"); rc, err = r.returncode, r.stderr
        else:                                                          # no mount here (root without CAP_SYS_ADMIN)
            from stem_nb.train import cli
            simulate_read_only(monkeypatch, ro)
            rc, err = cli([str(CONFIG), f"dump_dir={d}", *OVR, "steps=12"]), capsys.readouterr().err
            monkeypatch.undo()
    assert rc == 2, err[-3000:]
    one_message(err, "DumpDirError", f"dump_dir {d} is not writable", "use a dump_dir this user can write")
    assert digest(ro, skip=()) == before                               # the lock file included
    assert not d.exists() or d == ro


# -- a full disk while metrics.jsonl is cut back at resume --------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(mnt: Path, size: str):
    "A tmpfs of `size` at `mnt`, or None where this machine does not let us mount one."
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None; return
    try: yield mnt
    finally: subprocess.run(["umount", str(mnt)], capture_output=True)


def fill(fs: Path):
    "Write a filler file on `fs` until the device is full."
    with open(fs / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True: f.write(b"\0" * chunk)
            except OSError as e: assert e.errno == errno.ENOSPC, e


def test_disk_full_while_cutting_metrics_back_keeps_them(finished, tmp_path, monkeypatch, capsys):
    "A run killed after step 10 whose newest checkpoint is 5: resuming cuts metrics.jsonl back to 5 rows, on a full disk."
    with tmpfs(tmp_path / "fs", "40m") as fs:
        d = (fs if fs is not None else tmp_path) / "run"
        shutil.copytree(finished, d, ignore=shutil.ignore_patterns("0000000010"))
        before, rows = digest(d), steps_of(d)
        assert rows == list(range(1, 11))
        if fs is not None:                                             # a real full tmpfs, a real trainer
            fill(fs)
            r = run(d, "steps=7"); rc, err = r.returncode, r.stderr
        else:                                                          # no mount here: every fsync reports ENOSPC
            from stem_nb.train import cli
            def no_space(*a): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(os, "fsync", no_space)
            rc, err = cli([str(CONFIG), f"dump_dir={d}", *OVR, "steps=7"]), capsys.readouterr().err
            monkeypatch.undo()
        assert rc == 2, err[-3000:]
        one_message(err, "DumpDirError", f"writing {d / 'metrics.jsonl'} failed (No space left on device)",
                    "metrics.jsonl is as it was", "free some space and re-run the same command to resume")
        assert digest(d) == before and steps_of(d) == rows             # no row lost, no temporary file left
