"""`stem-nb reproduce` at the paper's scale, run as a user runs it, on 2 CPU cores: the paper-350m preset shrunk by
`--set` (dims, steps, 2 gloo processes with stem_parallel_size 2 and an FSDP backbone, a task subsample, two variants,
one seed) and run through `--executor local` (submitit's LocalExecutor), on a corpus prepared with `stem-nb prepare`
into a local data.root_dir, with the tokenizer given by path. One training job is killed midway (SIGKILL to its
process group); re-running the command resubmits it and it resumes bitwise (the same loss and gradient norm at every
step, and the same final weights, as an uninterrupted run of its config); the run ends with table_350m built from the
jobs' runs, the paper's values beside ours. `--status` submits and writes nothing. A job signalled before its time
limit requeues itself and resumes. `--dry-run --executor slurm` prints each sbatch script and the cost. Refusals (a bad
override, a missing input, a world that does not fit the nodes, a second caller, a torn state file) exit 2 with one
line and change nothing. A SLURM stand-in (sbatch / sacct / srun on PATH) shows that a live job never gets a second
one and that a lost one is submitted again."""
import json, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest, torch

from test_faults_train import digest, steps_of, wait_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("STEM_NB_ROOT", None)
STEPS, EVERY = 16, 4
BASE, HALF = "train_350m Baseline seed 0", "train_350m STEM 1/2 seed 0"


def settled_digest(path: Path, timeout: float = 120.0) -> dict:
    "`digest` once two reads 2 s apart agree (the jobs' processes have stopped writing)."
    prev, t0 = digest(path), time.time()
    while time.time() - t0 < timeout:
        time.sleep(2)
        cur = digest(path)
        if cur == prev: return cur
        prev = cur
    raise AssertionError(f"{path} kept changing for {timeout:.0f} s after the command returned")


def sets(data: Path) -> list[str]:
    "The paper-350m recipe at a size two cores train in seconds: same blocks and schedule shape, smaller everything."
    return ["world_size=2", "seeds=[0]", "eval_subsample={default: 2}", "experiments.table_350m.variants=[Baseline, STEM 1/2]",
            f"train_350m.steps={STEPS}", f"train_350m.checkpoint.every={EVERY}", "train_350m.log_every=4", "train_350m.val_batches=1",
            "train_350m.model={dim: 32, n_layers: 4, n_heads: 2, n_kv_heads: 1, vocab_size: 4096, multiple_of: 32, "
            "max_seq_len: 256, ffn_dim_multiplier: null}",
            f"train_350m.data.root_dir={data}", "train_350m.data.sources={tiny_shakespeare: 1.0}",
            f"train_350m.data.tokenizer={data / 'bpe4096.tiktoken'}", "train_350m.data.seq_len=32", "train_350m.data.batch_size=2",
            f"train_350m.data.cache_dir={data / 'tokens'}", "train_350m.optim.warmup=4", "train_350m.distributed.stem_parallel_size=2"]


def cmd(data: Path, *extra) -> list[str]:
    return [str(BIN / "stem-nb"), "reproduce", "--preset", "paper-350m", "--only", "table_350m",
            *[a for s in sets(data) for a in ("--set", s)], *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "A corpus the project ships, prepared by `stem-nb prepare` into a local root, and the project's BPE file, by path."
    d = tmp_path_factory.mktemp("data")
    r = subprocess.run([str(BIN / "stem-nb"), "prepare", "shakespeare", str(d / "tiny_shakespeare"), "--n-chunks", "2",
                        "--val-fraction", "0.05"], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    from stem_nb.data import default_bpe
    from stem_nb.corpora import data_dir
    default_bpe(4096)                                               # trained once and cached by the project
    shutil.copy(sorted((data_dir() / "tokenizers").glob("bpe4096-*.tiktoken"))[0], d / "bpe4096.tiktoken")
    return d


def clone(path: Path) -> Path:
    "A scratch checkout: the repo's experiments/ (presets and notebooks); runs/ is written there, never in the repo."
    shutil.copytree(ROOT / "experiments", path / "experiments")
    return path


def job_of(root: Path, label: str) -> dict:
    st = json.loads((root / "runs" / "paper-350m" / "state.json").read_text())
    return next(r for r in st["jobs"].values() if r["label"] == label)


def test_dry_run_prints_each_sbatch_script_and_the_cost(data, tmp_path):
    root = clone(tmp_path)
    r = subprocess.run(cmd(data, "--executor", "slurm", "--dry-run", "--partition", "gpuq", "--account", "proj", "--time-min", "90"),
                       cwd=root, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "# overrides (--set): world_size=2" in out
    assert "2 training job(s) of 2 process(es) (one per GPU), 2 evaluation job(s) of 1" in out, out
    scripts = out.split("# sbatch script of ")[1:]
    assert [s.split(":", 1)[0] for s in scripts] == [f"train job {BASE}", f"eval job eval {BASE}", f"train job {HALF}", f"eval job eval {HALF}"]
    for s, kind in zip(scripts, ("train", "eval") * 2):
        n = "2" if kind == "train" else "1"
        for line in (f"#SBATCH --ntasks-per-node={n}", f"#SBATCH --gpus-per-node={n}", "#SBATCH --partition=gpuq", "#SBATCH --account=proj",
                     f"#SBATCH --time={90 if kind == 'train' else 240}", "#SBATCH --signal=USR2@300", "-m submitit.core._submit"):
            assert line in s, (kind, line, s)
    assert "'distributed.stem_parallel_size=2'" in scripts[0] and "'model.stem_layers=1/2'" in scripts[2]
    assert not (root / "runs" / "paper-350m" / "state.json").exists()           # a dry run submits and records nothing
    # the unchanged recipe: 7 runs of 64 GPUs, each 100B tokens; GPU-hours = tokens x training FLOPs/token / (MFU x peak)
    r = subprocess.run([str(BIN / "stem-nb"), "reproduce", "--preset", "paper-350m", "--dry-run"], cwd=root, capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    assert "7 training job(s) of 64 process(es)" in r.stdout and "assumed: no scripts/gpu_check.sh record" in r.stdout, r.stdout
    # the memory per rank of each shape of run (seeds and gated variants share one), against the H100's 80 GiB
    plans = r.stdout.split("# memory plan of ")[1:]
    assert plans and plans[0].startswith("1 run(s): train_350m Baseline seed 0"), r.stdout
    assert all("memory per rank: world 64, stem_parallel_size 8" in p and "device memory" in p and "80.000" in p for p in plans), plans
    from stem_nb.flops import flops_per_token
    from stem_nb.model import preset
    tokens = 47684 * 512 * 4096
    want = tokens * flops_per_token(preset("paper-350m", ffn_type="dense", stem_layers="none"), 4096) / (0.4 * 989e12) / 3600
    row = next(l for l in r.stdout.splitlines() if "train_350m Baseline seed 0" in l and " train " in l)
    assert f"{tokens:,}" in row and f"{want:,.1f}" in row, (row, want)
    total = float(re.search(r"# cost: ([\d,.]+) GPU-hours for the 7 training run", r.stdout)[1].replace(",", ""))
    assert total > 7 * want * 0.9, total                                      # STEM variants cost a little less than dense
    # paper-1b: the mid-training runs start after the 1B runs whose checkpoints they continue
    r = subprocess.run([str(BIN / "stem-nb"), "reproduce", "--preset", "paper-1b", "--dry-run"], cwd=root, capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    rows = {l.split()[2] + " " + l.split()[3]: l.split() for l in r.stdout.splitlines() if re.match(r"^[0-9a-f]{12} +train ", l)}
    assert set(rows) == {"train_1b Baseline", "train_1b STEM", "midtrain Baseline", "midtrain STEM"}, rows
    assert rows["midtrain Baseline"][-1] == rows["train_1b Baseline"][0] and rows["midtrain STEM"][-1] == rows["train_1b STEM"][0]


def test_local_jobs_end_to_end_with_a_killed_and_resumed_job(data, tmp_path):
    root = clone(tmp_path / "clone")
    t0 = time.time()
    p = subprocess.Popen(cmd(data, "--executor", "local", "--poll-s", "1"), cwd=root, env=ENV, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    state = root / "runs" / "paper-350m" / "state.json"

    def first_checkpoint():
        if not state.exists(): return False
        try: rec = job_of(root, BASE)
        except (ValueError, StopIteration): return False                    # the file is replaced atomically; a race is a retry
        return bool(rec.get("job")) and (Path(rec["dump_dir"]) / "checkpoints" / f"{EVERY:010d}").is_dir()
    assert wait_for(first_checkpoint, p, timeout=900), p.communicate()
    rec = job_of(root, BASE)
    dump, pgid = Path(rec["dump_dir"]), int(rec["job"]["id"])
    os.killpg(pgid, signal.SIGSTOP)                                         # freeze it, then make sure it had not finished
    assert not (dump / "summary.json").exists(), "the job finished before the test could kill it: raise STEPS"
    os.killpg(pgid, signal.SIGKILL)
    killed_at = steps_of(dump)[-1]
    assert killed_at < STEPS
    out, err = p.communicate(timeout=1200)
    t1 = time.time()
    assert p.returncode == 1, out + err
    assert re.search(rf"{re.escape(BASE)}: local job {pgid} died at step \d+/{STEPS} \(gone; no exception in its log", out), out
    assert f"{HALF}: done" in out and f"eval {HALF}: done" in out, out
    assert "re-run the same command to submit them again (a training run resumes from its newest checkpoint)" in err, err

    # --status prints every job's state and submits (and writes) nothing. The command returns once every job's outputs
    # exist; a local job's process may still be writing its tail (submitit's result and log): let runs/ settle first
    before = settled_digest(root / "runs")
    r = subprocess.run(cmd(data, "--status"), cwd=root, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"^{re.escape(BASE)} +train +died \(died at step", r.stdout, re.M) and re.search(rf"^{re.escape(HALF)} +train +done", r.stdout, re.M), r.stdout
    assert digest(root / "runs") == before

    # an uninterrupted run of the killed job's own config, while the command resubmits the killed one
    ref = tmp_path / "ref"
    refp = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "stem_nb.train", str(dump / "config.yaml"),
                             f"dump_dir={ref}", "progress=none"], cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = subprocess.run(cmd(data, "--executor", "local", "--poll-s", "1"), cwd=root, capture_output=True, text=True, timeout=1200, env=ENV)
    t2 = time.time()
    rout, rerr = refp.communicate(timeout=600)
    assert refp.returncode == 0, rerr[-4000:]
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(rf"{re.escape(BASE)}: submitted as local job \d+ \(2 process\(es\), resuming from its newest checkpoint\)", r.stdout), r.stdout
    assert f"submitted as local job" not in r.stdout.split(f"{BASE}: done")[1].split(f"eval {BASE}")[0]   # nothing else resubmitted
    assert HALF + ": submitted" not in r.stdout, r.stdout                                                 # done before: left alone
    log = (dump / "train.log").read_text()
    m = re.search(rf"resumed from {re.escape(str(dump))}/checkpoints/(\d+)", log)
    assert m and EVERY <= int(m[1]) <= killed_at, log[-2000:]
    # bitwise: every step's loss and gradient norm, and the final weights, equal the uninterrupted run's
    got, want = [json.loads(l) for l in (dump / "metrics.jsonl").read_text().splitlines()], [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in got] == list(range(1, STEPS + 1)) == [x["step"] for x in want]
    assert [(x["loss"], x["grad_norm"]) for x in got] == [(x["loss"], x["grad_norm"]) for x in want]
    from stem_nb.restore import load_model
    a, b = load_model(dump).state_dict(), load_model(ref).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # the trainer ran as the recipe asks: 2 ranks, tables in 2 slices, FSDP backbone
    cfg = (dump / "config.yaml").read_text()
    assert "backbone: fsdp" in cfg and "stem_parallel_size: 2" in cfg and ", world 2," in log
    # the table, built by the notebook from the jobs' runs and evaluations (results JSON beside each run's checkpoints)
    for lbl in (BASE, HALF): assert list(Path(job_of(root, lbl)["dump_dir"]).glob("eval-*.json")), lbl
    md = (root / "runs" / "paper-350m" / "figures" / "tables" / "table_350m.md").read_text()
    assert "preset: paper-350m" in md and "[paper 57.66]" in md and "[paper 62.95]" in md, md        # arc_easy: Baseline, STEM 1/2
    assert re.search(r"^\| Baseline +\| +1 \|", md, re.M) and re.search(r"^\| STEM 1/2 +\| +1 \|", md, re.M), md
    assert re.search(r"^table_350m +done ", r.stdout, re.M), r.stdout
    st = json.loads(state.read_text())
    assert st["sets"] == sets(data) and st["executor"] == "local" and st["world_size"] == 2
    b = job_of(root, BASE)
    assert b["submissions"] == 2 and b["history"][0]["ended"].startswith("died at step") and b["history"][-1]["ended"] == "done"
    assert b["status"] == "done" and b["last_step"] == STEPS and b["hash"] == dump.name
    print(f"\n[timing] first call (kill at step {killed_at}) {t1 - t0:.0f} s, second call {t2 - t1:.0f} s, total {time.time() - t0:.0f} s")


def test_a_signalled_job_requeues_itself_and_resumes(data, tmp_path):
    "Near its time limit a job gets USR2 (SLURM's --signal, the local controller's); submitit requeues it and the run resumes."
    root = clone(tmp_path / "clone")
    one = cmd(data, "--set", "experiments.table_350m.variants=[Baseline]", "--executor", "local")
    r = subprocess.run([*one, "--no-wait"], cwd=root, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0 and "1 job(s) queued or running" in r.stdout, r.stdout + r.stderr
    rec = job_of(root, BASE)
    dump, ctl = Path(rec["dump_dir"]), int(rec["job"]["id"])
    t0 = time.time()
    while not (dump / "checkpoints" / f"{EVERY:010d}").is_dir():
        assert time.time() - t0 < 600 and not (dump / "summary.json").exists(), "no checkpoint to resume from, or already finished"
        time.sleep(0.05)
    tasks = [int(x) for x in subprocess.run(["ps", "-o", "pid=", "--ppid", str(ctl)], capture_output=True, text=True).stdout.split()]
    assert len(tasks) == 2, tasks
    for t in tasks: os.kill(t, signal.SIGUSR2)                  # what the controller (or SLURM) sends before the limit
    while (Path(f"/proc/{ctl}").exists() and "Z" not in Path(f"/proc/{ctl}/stat").read_text().rsplit(")", 1)[1].split()[0]):
        assert time.time() - t0 < 900, "the requeued job did not finish"
        time.sleep(0.5)
    assert (dump / "summary.json").exists(), (dump / "train.log").read_text()[-3000:]
    assert "Caught signal SIGUSR2" in (Path(rec["job"]["folder"]) / f"{ctl}_0_log.err").read_text()
    log = (dump / "train.log").read_text()
    assert log.count(" starting ") == 1 and len(re.findall(rf"resumed from {re.escape(str(dump))}/checkpoints/\d+", log)) == 1, log
    stop = re.search(r"STOPPED: stopped on request after step (\d+) of", log)           # the step it was on, saved at the signal
    assert stop and f"resumed from {dump}/checkpoints/{int(stop[1]):010d}" in log, log
    assert steps_of(dump)[-1] == STEPS
    r = subprocess.run(cmd(data, "--set", "experiments.table_350m.variants=[Baseline]", "--status"), cwd=root, capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert re.search(rf"^{re.escape(BASE)} +train +done +local:{ctl} +{STEPS}/{STEPS}", r.stdout, re.M), r.stdout   # one job, requeued in place


def test_refusals_name_the_problem_and_change_nothing(data, tmp_path):
    "A bad override, a missing input, a world that does not fit the nodes, a second caller, an unreadable state file: exit 2, one line, nothing written or submitted."
    import fcntl
    root = clone(tmp_path / "clone")
    runs = root / "runs" / "paper-350m"; runs.mkdir(parents=True)
    (runs / "state.json").write_text('{"version": 1, "preset": "paper-350m", "jobs": {}}')
    before = digest(root)
    run = lambda *a: subprocess.run(cmd(data, *a), cwd=root, capture_output=True, text=True, timeout=300, env=ENV)
    cases = [(("--set", "train350m.steps=4", "--executor", "local"), "--set train350m.steps: preset 'paper-350m' has no key 'train350m'"),
             (("--set", "train_350m.data.sources={not_prepared: 1.0}", "--executor", "local"),
              f"{data}/not_prepared is missing: run `stem-nb prepare <corpus> {data}/not_prepared`"),
             (("--set", "world_size=12", "--executor", "slurm", "--dry-run"), "world_size 12 is not a multiple of gpus_per_node 8")]
    for args, msg in cases:
        r = run(*args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stdout[-2000:], r.stderr[-2000:])
        assert digest(root) == before, args
    fd = os.open(runs / ".state.lock", os.O_RDWR | os.O_CREAT)                # another call of the command holds the preset
    try:
        fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b"4242")
        before = digest(root, skip=())
        r = run("--executor", "local")
        assert r.returncode == 2 and "another `stem-nb reproduce --preset paper-350m` is running (pid 4242" in r.stderr, r.stderr
        assert digest(root, skip=()) == before and not (runs / "jobs").exists()
    finally: os.close(fd)
    (runs / "state.json").write_text('{"jobs": [tru')                          # a torn state file: never guessed around
    before = digest(root)
    r = run("--executor", "local")
    assert r.returncode == 2 and f"state file {runs / 'state.json'} is unreadable" in r.stderr and "stop them, then move the file aside" in r.stderr
    assert digest(root) == before and not (runs / "jobs").exists()


FAKE_SLURM = {
    "sbatch": 'n=$(cat "$FAKE/n" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$FAKE/n"; cp "$1" "$FAKE/sbatch_$n.sh"; '
              'echo "Submitted batch job $((4240+n))"',
    "sacct": 'while [ $# -gt 0 ]; do [ "$1" = "-j" ] && id=$2; shift; done; cat "$FAKE/state_$id" 2>/dev/null || echo RUNNING',
    "srun": "exit 0",
}


def test_slurm_never_doubles_a_live_job_and_resubmits_a_lost_one(data, tmp_path):
    "sbatch, sacct and srun stand-ins on PATH: the jobs are submitted, never again while SLURM says they live, again once lost."
    root, fake = clone(tmp_path / "clone"), tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    for name, body in FAKE_SLURM.items():
        (fake / "bin" / name).write_text(f"#!/bin/sh\n{body}\n"); (fake / "bin" / name).chmod(0o755)
    env = {**ENV, "PATH": f"{fake / 'bin'}:{ENV['PATH']}", "FAKE": str(fake)}
    slurm = lambda: subprocess.run(cmd(data, "--executor", "slurm", "--partition", "gpuq"), cwd=root, capture_output=True, text=True,
                                   timeout=300, env=env)
    r = slurm()
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{BASE}: submitted as slurm job 4241 (2 process(es))" in r.stdout and f"{HALF}: submitted as slurm job 4242" in r.stdout
    assert "2 job(s) queued or running" in r.stdout, r.stdout
    script = (fake / "sbatch_1.sh").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --partition=gpuq" in script and "#SBATCH --signal=USR2@300" in script
    state = root / "runs" / "paper-350m" / "state.json"
    before = state.read_text()
    r = slurm()                                                             # sacct: RUNNING -> nothing submitted
    assert r.returncode == 0 and (fake / "n").read_text().strip() == "2", r.stdout + r.stderr
    assert re.search(rf"^{re.escape(BASE)} +train +running +slurm:4241", r.stdout, re.M), r.stdout
    subs = lambda st: {k: (r["job"], r["submissions"], r["history"]) for k, r in json.loads(st)["jobs"].items()}
    assert subs(state.read_text()) == subs(before)                         # the same jobs, no new submission recorded
    (fake / "state_4241").write_text("NODE_FAIL\n")                        # the first job's node was lost
    r = slurm()
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{BASE}: slurm job 4241 died at step 0/{STEPS} (node_fail; no exception in its log" in r.stdout, r.stdout
    assert f"{BASE}: submitted as slurm job 4243" in r.stdout and (fake / "n").read_text().strip() == "3"
    rec = job_of(root, BASE)
    assert rec["job"]["id"] == "4243" and rec["submissions"] == 2 and rec["history"][0]["id"] == "4241"
    assert job_of(root, HALF)["job"]["id"] == "4242" and job_of(root, HALF)["submissions"] == 1
