"""The trainer beyond its loop: profiling traces and MFU/HFU, TensorBoard and W&B tracking, float8 (refused without a
capable GPU), the dump dir's base_config.yaml, code/ and submit.slurm, and configs written for the reference (Meta
Lingua's shape). Tiny model (experiments/configs/debug.yaml), a few steps per run, in this process; the faults a
user meets on the command line run as a user would (`python -m stem_nb.train`), asserting the message, the exit
code and that nothing is written."""
import json, os, re, shutil, struct, subprocess, sys
from pathlib import Path

import pytest
import yaml

from test_faults_train import CONFIG, ENV, ROOT, digest

FAST = ["steps=3", "checkpoint.every=0", "eval_every=0", "val_batches=0", "progress=none", "log_every=1"]
REF = ROOT / "experiments" / "configs" / "reference_example.yaml"
BUILT_ELSEWHERE = {"data.load_async", "distributed.selective_activation_checkpointing"}   # keys that may not be settings yet
for _k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"): os.environ[_k] = ENV[_k]   # runs in this process


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    for k in ("SLURM_JOB_ID", "SLURM_SUBMIT_DIR", "STEM_NB_SUBMIT_SCRIPT", "WANDB_MODE"): monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(ROOT)


def train_here(dump, *extra, config=CONFIG):
    "Train the debug config in this process as `stem-nb train CONFIG dump_dir=... FAST extra` does."
    from stem_nb.train import train
    from stem_nb.train_config import load_train_config
    return train(load_train_config(config, [f"dump_dir={dump}", *FAST, *extra]), config_file=config)


def metrics(dump): return [json.loads(l) for l in (Path(dump) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "stem_nb.train", *map(str, args)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    "A finished 3-step run, started from experiments/configs/debug.yaml (copied by each test that changes it)."
    d = tmp_path_factory.mktemp("base") / "run"
    for k in ("SLURM_JOB_ID", "STEM_NB_SUBMIT_SCRIPT"): os.environ.pop(k, None)
    cwd = os.getcwd(); os.chdir(ROOT)
    try: s = train_here(d)
    finally: os.chdir(cwd)
    return d, s


# -- 4. profiling: traces, MFU and HFU ---------------------------------------------------------------------------
def test_profiling_trace_holds_the_table_lookup_and_optimizer(tmp_path):
    d = tmp_path / "run"
    s = train_here(d, "profiling.run=true", "profiling.profile_warmup=1", "profiling.profile_steps=2")
    traces = sorted((d / "profiling").rglob("*.json"))
    assert [str(p.relative_to(d)) for p in traces] == ["profiling/profile_CPU_000003/rank0.pt.trace.json"]
    assert s["profiling"] == [str(traces[0])]
    ev = json.loads(traces[0].read_text())["traceEvents"]                 # parses as JSON (Chrome trace format)
    names = {e.get("name") for e in ev}
    assert sum(str(n).startswith("ProfilerStep#") for n in names) == 2  # steps 2 and 3, after 1 warmup step
    assert {"table_optim.settle", "optim.step", "optim.clip", "model.forward", "model.backward",
            "Optimizer.step#TableAdamW.step", "TableRowsBackward"} <= names
    # the table lookup: aten::embedding of a [V, H] = [4096, 192] table inside a TableRows range
    rows = [e for e in ev if e.get("name") == "TableRows" and e.get("ph") == "X"]
    looks = [e for e in ev if e.get("name") == "aten::embedding" and e.get("args", {}).get("Input Dims", [None])[0] == [4096, 192]]
    assert len(looks) == 2 * 2, len(looks)                              # 2 STEM layers x 2 traced steps
    assert all(any(r["tid"] == e["tid"] and r["ts"] <= e["ts"] and e["ts"] + e["dur"] <= r["ts"] + r["dur"] for r in rows)
               for e in looks)
    log = (d / "train.log").read_text()
    assert "memory snapshot needs CUDA and this run is on cpu" in log
    assert log.count("mfu and hfu are null in metrics.jsonl: no peak FLOP/s is known for cpu") == 1
    assert [(r["mfu"], r["hfu"]) for r in metrics(d)] == [(None, None)] * 3


def test_profiling_keys_are_checked():
    from stem_nb.config import ConfigError
    from stem_nb.train_config import load_train_config
    with pytest.raises(ConfigError, match="profiling.profile_steps must be >= 1, got 0"):
        load_train_config(CONFIG, ["profiling.profile_steps=0"])
    with pytest.raises(ConfigError, match="profiling.trace_folder must be a folder inside dump_dir"):
        load_train_config(CONFIG, ["profiling.trace_folder=/tmp/x"])


def _mfu_checks(dump):
    "With a peak of 1e9 FLOP/s: each row's MFU is the model's FLOPs per token x tokens/s / 1e9; HFU equals it (no recomputation)."
    from stem_nb.flops import flops_per_token
    from stem_nb.train_config import load_train_config
    args = load_train_config(CONFIG, FAST)
    fpt = flops_per_token(args.model, args.data.seq_len)
    for r in metrics(dump):
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 1e9, rel=1e-12) and r["hfu"] == r["mfu"]
    assert "mfu and hfu are null" not in (Path(dump) / "train.log").read_text()


# -- 6. tracking -----------------------------------------------------------------------------------------------
def test_tensorboard_events_equal_metrics_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    d = tmp_path / "run"
    over = ["logging.tensorboard=true", "checkpoint.every=3", "checkpoint.at_end=false", "peak_tflops=0.001"]
    train_here(d, "steps=4", *over)                      # rows 1-4, a checkpoint at 3
    train_here(d, "steps=5", *over)                      # resumes at 3: metrics.jsonl drops row 4, TensorBoard purges it
    rows = metrics(d)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    ea = EventAccumulator(str(d / "tb")); ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("loss")] == [(r["step"], r["loss"]) for r in rows]   # exactly, step 4 once
    assert [(e.step, e.value) for e in ea.Scalars("tokens")] == [(r["step"], r["tokens"]) for r in rows]
    assert set(ea.Tags()["scalars"]) == {k for k, v in rows[0].items() if k != "step"}
    assert [(e.step, e.value) for e in ea.Scalars("hfu")] == [(r["step"], pytest.approx(r["hfu"], rel=1e-6)) for r in rows]
    _mfu_checks(d)                                       # with a peak given, MFU and HFU per step


def _wandb_records(path):
    "The records of a W&B run file (`run-<id>.wandb`: a 7-byte header, then a LevelDB log of protobuf records)."
    from wandb.proto import wandb_internal_pb2 as pb
    data, block, pos, buf, out = Path(path).read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7: pos += block - pos % block; continue     # a block's tail too short for a header
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]); pos += 7
        if kind == 0 and n == 0: pos += block - pos % block; continue
        buf += data[pos:pos + n]; pos += n
        if kind in (1, 4): rec = pb.Record(); rec.ParseFromString(buf); out.append(rec); buf = b""   # FULL / LAST
    return out


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    d = tmp_path / "run"
    train_here(d, "steps=4", "logging.wandb=true", "name=wb-check")
    rid = (d / "wandb" / "run_id.txt").read_text().strip()
    runs = sorted((d / "wandb").glob("offline-run-*"))
    assert [p.name.endswith(f"-{rid}") for p in runs] == [True]
    recs = _wandb_records(runs[0] / f"run-{rid}.wandb")
    hist = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in recs if r.WhichOneof("record_type") == "history"]
    rows = metrics(d)
    assert [(h["_step"], h["loss"], h["lr"], h["tokens"]) for h in hist] == [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in rows]
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert (run.run_id, run.display_name, run.project) == (rid, "wb-check", "stem-nb")


# -- 7. float8 -------------------------------------------------------------------------------------------------
def test_float8_is_refused_on_cpu_before_anything_is_written(base_run, tmp_path):
    fresh = tmp_path / "fresh"
    r = cli(CONFIG, f"dump_dir={fresh}", "distributed.float8=true", *FAST)
    assert r.returncode == 2, r.stderr[-3000:]
    assert ("distributed.float8=true needs a CUDA GPU of compute capability >= 8.9 (H100, H200, L40S, RTX 4090, B200); "
            "this run is on cpu: set distributed.float8=false") in r.stderr
    assert "Traceback" not in r.stderr and not fresh.exists()
    d = tmp_path / "run"; shutil.copytree(base_run[0], d)                  # a resume with float8: refused, the run untouched
    before = digest(d)
    r = cli(CONFIG, f"dump_dir={d}", "distributed.float8=true", "device=cpu", *FAST[1:], "steps=5")
    assert r.returncode == 2 and "this run is on cpu: set distributed.float8=false" in r.stderr, r.stderr[-3000:]
    assert digest(d) == before


def test_float8_converts_the_blocks_linears_only():
    import torch
    from stem_nb.train import build_model
    from stem_nb.train_config import convert_float8, float8_linears, load_train_config, n_float8
    m = build_model(load_train_config(CONFIG, ["device=cpu"]), torch.device("cpu"))
    keys, expected = list(m.state_dict()), float8_linears(m)
    names = convert_float8(m)                                             # torchao's module swap runs on any device
    assert names == sorted(expected) and len(names) == 19 == n_float8(m)
    mods = dict(m.named_modules())
    assert all(type(mods[n]).__name__ == "Float8Linear" for n in names)
    assert type(mods["output"]) is torch.nn.Linear and all(type(t) is torch.nn.Embedding for t in m.stem_tables.values())
    assert list(m.state_dict()) == keys                                   # checkpoints are unchanged by float8


def test_gpu_check_float8_section_dry_run(tmp_path):
    from stem_nb.gpu_check import _gpu_check_setup
    from stem_nb.train import gpu_check_float8
    rows = gpu_check_float8(_gpu_check_setup(dry_run=True), tmp_path)
    assert [(r["section"], r["item"], r["value"]) for r in rows] == [("float8", "refused on the CPU", "yes")]
    assert "compute capability >= 8.9" in rows[0]["note"]


# -- 8. the dump dir ----------------------------------------------------------------------------------------------
def test_dump_dir_records_config_code(base_run):
    from stem_nb.config import load_config
    from stem_nb.train_config import TrainArgs, load_train_config
    d, _ = base_run
    assert (d / "base_config.yaml").read_bytes() == CONFIG.read_bytes()      # the file as given, comments and all
    assert load_config(TrainArgs, d / "config.yaml") == load_train_config(CONFIG, [f"dump_dir={d}", *FAST])
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert (d / "code" / "commit.txt").read_text() == head and len(head.strip()) == 40
    assert sorted(p.name for p in (d / "code").iterdir()) == ["commit.txt", "diff.patch", "untracked.txt"]
    assert not (d / "submit.slurm").exists()                                 # not a SLURM job
    assert f"code: commit {head.strip()}" in (d / "train.log").read_text()


def test_a_resume_keeps_base_config_and_code_and_adds_other_code(base_run, tmp_path, monkeypatch):
    import stem_nb.run_dir as R
    d = tmp_path / "run"; shutil.copytree(base_run[0], d)
    before = {k: v for k, v in digest(d).items() if k == "base_config.yaml" or k.startswith("code/")}
    recorded = {n: (d / "code" / n).read_text() for n in ("commit.txt", "diff.patch", "untracked.txt")}
    monkeypatch.setattr(R, "code_record", lambda root=None: recorded)        # (the checkout may change while tests run)
    train_here(d, "steps=4", config=d / "config.yaml")                       # resumed from its own config.yaml, the same code
    assert {k: v for k, v in digest(d).items() if k == "base_config.yaml" or k.startswith("code/")} == before
    monkeypatch.setattr(R, "code_record", lambda root=None: {**recorded, "commit.txt": "f" * 40 + "\n"})
    train_here(d, "steps=5")                                                # other code: recorded beside, nothing rewritten
    after = digest(d)
    assert {k: v for k, v in after.items() if k in before} == before
    assert (d / "code" / "step-0000000004" / "commit.txt").read_text() == "f" * 40 + "\n"
    assert sorted(k for k in after if k.startswith("code/step-")) == [f"code/step-0000000004/{n}" for n in ("commit.txt", "diff.patch", "untracked.txt")]
    assert [r["step"] for r in metrics(d)] == [1, 2, 3, 4, 5] and "recorded in code/step-0000000004/" in (d / "train.log").read_text()


def _git(root, *a):
    return subprocess.run(["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t", *a],
                          capture_output=True, text=True, check=True).stdout


def test_code_record_is_the_commit_and_the_diff_that_rebuilds_the_tree(tmp_path):
    from stem_nb.run_dir import code_record
    repo = tmp_path / "repo"; repo.mkdir()
    _git(repo, "init", "-q"); (repo / "a.py").write_text("x = 1\n"); (repo / "b.bin").write_bytes(b"\0\1")
    _git(repo, "add", "."); _git(repo, "commit", "-qm", "c")
    (repo / "a.py").write_text("x = 2\n"); (repo / "b.bin").write_bytes(b"\0\2\3"); (repo / "new.py").write_text("y\n")
    rec = code_record(repo)
    assert rec["commit.txt"] == _git(repo, "rev-parse", "HEAD") and rec["untracked.txt"] == "new.py\n"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    _git(clone, "checkout", "-q", rec["commit.txt"].strip())
    (tmp_path / "d.patch").write_text(rec["diff.patch"])
    _git(clone, "apply", "--binary", str(tmp_path / "d.patch"))
    assert ((clone / "a.py").read_text(), (clone / "b.bin").read_bytes()) == ("x = 2\n", b"\0\2\3")


def test_outside_git_and_in_a_slurm_job(tmp_path, monkeypatch):
    import stem_nb.run_dir as R
    nogit = tmp_path / "site-packages"; nogit.mkdir()
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --output=logs/%j.out\nsrun stem-nb train c.yaml\n")
    monkeypatch.setattr(R, "code_root", lambda: nogit)
    monkeypatch.setenv("SLURM_JOB_ID", "4242"); monkeypatch.setenv("SLURM_SUBMIT_DIR", str(tmp_path / "submit"))
    monkeypatch.setenv("STEM_NB_SUBMIT_SCRIPT", str(script))
    d = tmp_path / "run"
    train_here(d)
    assert sorted(p.name for p in (d / "code").iterdir()) == ["not_a_git_checkout.txt"]
    assert f"{nogit} is not a git checkout" in (d / "code" / "not_a_git_checkout.txt").read_text()
    assert (d / "submit.slurm").read_text() == ("#!/bin/bash\n" f"#SBATCH --chdir={tmp_path / 'submit'}\n"
                                                "#SBATCH --nodes=1\n#SBATCH --output=logs/%j.out\nsrun stem-nb train c.yaml\n")
    log = (d / "train.log").read_text()
    assert "is not a git checkout" in log and f"submit.slurm: the batch script of SLURM job 4242 (STEM_NB_SUBMIT_SCRIPT={script})" in log


def test_slurm_script_from_scontrol_and_when_it_cannot_be_had(tmp_path, monkeypatch):
    from stem_nb.run_dir import slurm_script
    bin_ = tmp_path / "bin"; bin_.mkdir()
    (bin_ / "scontrol").write_text('#!/bin/sh\n[ "$*" = "write batch_script 77 -" ] && printf "#!/bin/sh\\nsrun x\\n" && exit 0\n'
                                   'echo "scontrol: error: Invalid job id specified" >&2; exit 1\n')
    (bin_ / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:/usr/bin:/bin")
    assert slurm_script({"SLURM_JOB_ID": "77"}) == ("#!/bin/sh\nsrun x\n", "scontrol write batch_script 77")
    txt, why = slurm_script({"SLURM_JOB_ID": "78"})
    assert txt is None and "Invalid job id specified" in why and "STEM_NB_SUBMIT_SCRIPT" in why
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    txt, why = slurm_script({"SLURM_JOB_ID": "77"})
    assert txt is None and "scontrol write batch_script 77 -" in why and "STEM_NB_SUBMIT_SCRIPT" in why


# -- 9. configs written for the reference ------------------------------------------------------------------------
def test_reference_example_loads_or_names_exactly_the_keys_it_cannot_honour(tmp_path):
    from stem_nb.config import ConfigError
    from stem_nb.train_config import from_reference, load_train_config, unknown_keys
    raw = yaml.safe_load(REF.read_text())
    unknown = set(unknown_keys(from_reference(raw)[0]))
    assert unknown <= BUILT_ELSEWHERE, unknown - BUILT_ELSEWHERE           # every other reference key is honoured
    if unknown:
        with pytest.raises(ConfigError) as e: load_train_config(REF)
        msg = str(e.value)
        assert msg.startswith(f"config file {REF}: {len(unknown)} key(s) stem-nb train cannot honour: ")
        named = msg.split("cannot honour: ")[1].split(". Remove them")[0]
        assert set(re.findall(r"([\w.]+) \(", named)) == unknown
    for k in unknown:                                                     # the rest loads, each key read into ours
        sec, _, key = k.rpartition("."); (raw[sec] if sec else raw).pop(key)
    f = tmp_path / "ref.yaml"; f.write_text(yaml.safe_dump(raw))
    a = load_train_config(f)
    assert (a.dump_dir, a.name, a.steps, a.seed) == ("/path/to/dumpdir", "debug", 1000, 12)
    assert (a.optim.lr, a.optim.warmup, a.optim.lr_min_ratio, a.optim.clip) == (3e-4, 2000, 1e-6, 10.0)
    assert (a.distributed.backbone, a.compile, a.distributed.stem_parallel_size) == ("fsdp", True, 8)
    assert (a.model.dim, a.model.n_layers, a.model.n_heads, a.model.ffn_type, a.model.table_layers) == (1024, 8, 8, "stem", [1, 3, 5, 7])
    assert (a.data.root_dir, a.data.sources, a.data.batch_size, a.data.seq_len, a.data.tokenizer) == \
        ("data/shuffled", {"wikipedia": 80.0, "arxiv": 20.0}, 32, 1024, "tokenizers/llama2.model")


def test_cli_names_each_reference_key_it_cannot_honour(base_run, tmp_path):
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg = {"probe_freq": 100, **cfg, "logging": {"freq": 10}, "checkpoint": {**cfg["checkpoint"], "dump": {"every": 100}}}
    f = tmp_path / "lingua.yaml"; f.write_text(yaml.safe_dump(cfg, sort_keys=False))
    d = tmp_path / "run"; shutil.copytree(base_run[0], d)
    before = digest(d)
    r = cli(f, f"dump_dir={d}", "optim.lrr=1")
    assert r.returncode == 2, r.stderr[-3000:]
    assert (f"config file {f}: 4 key(s) stem-nb train cannot honour: probe_freq (no such setting); "
            "checkpoint.dump (use checkpoint.every and checkpoint.keep); logging.freq (use log_every); "
            "optim.lrr (no such setting). Remove them (or use the settings named) and re-run") in r.stderr
    assert "Traceback" not in r.stderr and digest(d) == before
