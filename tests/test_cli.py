"""Crosses notebooks: the console script, the model family end to end, accounting vs instantiated models; config and
launcher refusals from the command line (a job with no node, a NaN in a config, a secret from the environment)."""
import json, math, os, re, subprocess, sys
from pathlib import Path

import pytest, torch, yaml

from stem_nb.cli import main
from stem_nb.flops import count_params, flops_per_token, params_table
from stem_nb.model import FFN_TYPES, ModelArgs, Transformer, preset
from stem_nb.config import ConfigError, load_config
from test_faults_data import _check, _train
from test_faults_train import ENV as TRAIN_ENV, digest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_console_script_smoke():
    "`stem-nb smoke` prints one row per variant whose counts are the analytic ones, with a finite loss near ln V at init."
    r = subprocess.run([str(BIN / "stem-nb"), "smoke"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    head, *rows = [l.split() for l in r.stdout.strip().splitlines()]
    col = {k: i - len(head) for i, k in enumerate(head)}                 # from the right: stem_layers holds spaces
    got = {row[0]: row for row in rows}
    assert sorted(got) == sorted(FFN_TYPES), r.stdout
    for f in FFN_TYPES:
        c = count_params(preset("debug", ffn_type=f, stem_layers="all", n_experts=4))
        assert [int(got[f][col[k]]) for k in ("total", "active", "stem")] == [c["total"], c["active"], c["stem"]], (f, got[f])
        assert abs(float(got[f][col["loss"]]) - math.log(512)) < 1.0, (f, got[f])   # debug preset: V = 512


def test_unknown_command_is_an_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "frobnicate" in capsys.readouterr().err


def test_model_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.stem_layers"):
        load_config(ModelArgs, overrides=["ffn_type=stem", "n_layers=4", "stem_layers=[1,9]"])
    with pytest.raises(ConfigError, match="dimm"):
        load_config(ModelArgs, overrides=["dimm=3"])
    a = load_config(ModelArgs, overrides=["ffn_type=stem", "stem_layers=[1,3]", "dim=64"])
    assert a.table_layers == [1, 3] and a.dim == 64


@pytest.mark.parametrize("ffn", FFN_TYPES)
def test_every_variant_trains_a_step(ffn):
    a = preset("debug", ffn_type=ffn, stem_layers="all", n_experts=4)
    m = Transformer(a)
    assert count_params(a)["total"] == sum(p.numel() for p in m.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randint(0, a.vocab_size, (4, 33))
    l0 = m(x[:, :-1], x[:, 1:]); l0.backward(); opt.step(); opt.zero_grad()
    l1 = m(x[:, :-1], x[:, 1:])
    assert l1.item() < l0.item()   # one SGD step on the same batch lowers its loss


def test_paper_presets_count_on_meta():
    t = params_table(build=True)
    # active counts agree with the paper's reported ones to 0.01B (total counts may not: see nbs/04_flops)
    assert ((t.active_B - t.paper_active_B).abs() < 0.01).all(), t


def test_ctrl_c_in_train_exits_130_without_traceback(tmp_path):
    "Ctrl-C (SIGINT to the process group, as a terminal sends it) in any subcommand: exit 130, one line, no traceback."
    import signal, time
    dump = tmp_path / "run"
    p = subprocess.Popen([str(BIN / "stem-nb"), "train", "steps=100000", f"dump_dir={dump}", "device=cpu", "val_batches=0",
                          "progress=lines", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.vocab_size=512",
                          "data.tokenizer=byte", "data.sources={bios: 1.0}", "data.seq_len=32", "data.batch_size=2",
                          f"data.cache_dir={tmp_path / 'cache'}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((dump / "metrics.jsonl").exists() and (dump / "metrics.jsonl").stat().st_size > 0):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out + err
    assert "interrupted" in err and "re-run the same command to resume" in err and "Traceback" not in err, err


def test_slurm_dry_run_prints_the_sbatch_script(tmp_path):
    r = subprocess.run([str(BIN / "stem-nb"), "slurm", str(ROOT / "experiments/configs/debug.yaml"), "steps=10", "--nodes", "2",
                        "--gpus-per-node", "4", "--folder", str(tmp_path), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "#SBATCH --gpus-per-node=4" in r.stdout and "(world = 8)" in r.stdout


def test_gpu_check_dry_run_prints_every_section(tmp_path):
    "scripts/gpu_check.sh --dry-run: every section at tiny dims on the CPU, the table last, within a minute or so."
    import time
    t0 = time.time()
    r = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--json", str(tmp_path / "rows.json")],
                       capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    took = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {x["section"] for x in rows} == {"train", "paper-step", "decode", "offload", "fsdp", "float8"}
    assert next(x for x in rows if x["section"] == "float8")["item"] == "refused on the CPU"          # float8 needs sm89+
    mem = next(x for x in rows if x["section"] == "paper-step" and x["item"].startswith("peak memory"))
    assert float(mem["value"]) > 0 and "plan " in mem["note"], mem
    assert not [x for x in rows if x["item"] == "-"], rows                 # no section failed
    # every rate is work / seconds: one step (seq 64 x batch 2 = 128 tokens; decode: batch 8 x 8 new tokens = 64) cannot
    # take longer than its whole section (the log's "[gpu-check] <section>: <s> s"), nor run at 1 TFLOP/s on one CPU thread
    secs = {m[1]: float(m[2]) + 0.05 for m in re.finditer(r"\[gpu-check\] (\S+): ([\d.]+) s", r.stdout + r.stderr)}
    fwd = flops_per_token(preset("debug"), 64, training=False)
    rates = {(x["section"], x["item"]): float(x["value"]) for x in rows if x["item"].endswith(" tokens/s") and " / " not in x["item"]}
    assert sorted(rates) == [("decode", "STEM 1/3 tokens/s"), ("decode", "dense tokens/s"), ("fsdp", "FSDP2 STEM 1/3 tokens/s"),
                             ("paper-step", "debug dims STEM 1/3 tokens/s"), ("train", "STEM 1/3 tokens/s"),
                             ("train", "dense tokens/s")], sorted(rates)
    for (sec, item), v in rates.items():
        work = 64 if sec == "decode" else 128
        assert work / secs[sec] <= v < 1e12 / (fwd if sec == "decode" else 3 * fwd), (sec, item, v, secs[sec])
    ratio = next(x for x in rows if x["item"] == "STEM 1/3 / dense tokens/s")["value"]
    assert ratio == pytest.approx(rates["train", "STEM 1/3 tokens/s"] / rates["train", "dense tokens/s"], abs=2e-3), ratio
    assert {x["note"] for x in rows if x["section"] == "decode"} == {"batch 8, 8 new tokens, prompt 32"}
    assert next(x for x in rows if x["section"] == "fsdp")["note"].startswith("gloo, 4 steps, loss ")
    table = r.stdout.strip().splitlines()
    assert re.match(r"section +\| item", table[-len(rows) - 2]) and "float8" in table[-1]
    assert took < 120, f"gpu_check --dry-run took {took:.0f} s"


# -- refusals from the command line: nothing printed or written before the message -----------------------------------

@pytest.mark.parametrize("args, msg", [
    (["--nodes", "0"], "--nodes must be an integer >= 1, got 0"),
    (["--nodes", "-2"], "--nodes must be an integer >= 1, got -2"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be an integer >= 1, got 0"),
    (["--config-missing"], "config file not found: "),
])
def test_slurm_refuses_a_job_that_cannot_run(tmp_path, args, msg):
    "`stem-nb slurm` with no node, no GPU or no config file: one line, exit 2, no sbatch script, the log folder untouched."
    logs = tmp_path / "logs"; (logs / "123").mkdir(parents=True); (logs / "123" / "123_0_log.out").write_text("an earlier job\n")
    before = digest(logs)
    config = str(tmp_path / "nope.yaml") if args == ["--config-missing"] else str(ROOT / "experiments/configs/debug.yaml")
    extra = [] if args == ["--config-missing"] else args
    r = subprocess.run([str(BIN / "stem-nb"), "slurm", config, "steps=10", *extra, "--folder", str(logs), "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr, r.stdout + r.stderr          # no script with world 0
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"stem-nb slurm: {msg}"), line
    if args == ["--config-missing"]: assert config in line
    assert digest(logs) == before and sorted(p.name for p in logs.iterdir()) == ["123"]


@pytest.mark.parametrize("override", ["optim.clip=nan", "optim.eps=inf", "peak_tflops=inf", "model.norm_eps=-inf",
                                      "data.val_fraction=nan"])
def test_nonfinite_config_value_refused_before_anything(tmp_path, override):
    "A NaN or an infinity where a number is needed: one message naming the key, exit 2, the dump dir as it was (no lock)."
    r, before, after = _train(tmp_path, override)
    key, value = override.split("=")
    _check(r, before, after, f"config key '{key}' (command line): {value} is not a finite number")
    assert after == before


def test_nonfinite_value_in_a_config_file_names_the_file(tmp_path):
    cfg = yaml.safe_load((ROOT / "experiments/configs/debug.yaml").read_text())
    cfg["optim"]["lr"] = float("nan")
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(cfg))                      # `lr: .nan`
    r, before, after = _train(tmp_path, config=tmp_path / "nan.yaml")
    _check(r, before, after, f"config key 'optim.lr' ({tmp_path / 'nan.yaml'}): nan is not a finite number")
    assert after == before


SECRET = f"hf_tok-{os.urandom(8).hex()}"     # made at run time: no file (this test's source in a recorded diff) holds it


def test_env_secret_is_never_written_and_the_run_resumes(tmp_path):
    """A config that takes a value from the environment (`${oc.env:MY_SECRET}`): after 2 steps no file under the dump dir
    holds the value; the run resumes from its own config.yaml with the variable set, and without it is refused by name."""
    cfg = yaml.safe_load((ROOT / "experiments/configs/debug.yaml").read_text())
    cfg["data"]["text_field"] = "${oc.env:MY_SECRET}"
    (tmp_path / "secret.yaml").write_text(yaml.safe_dump(cfg))
    dump = tmp_path / "run"
    train = lambda config, *over, env=TRAIN_ENV: subprocess.run(
        [sys.executable, "-m", "stem_nb.train", str(config), f"dump_dir={dump}", "val_batches=0", "checkpoint.every=0",
         "log_every=1", "progress=lines", *over], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)

    def leaks():
        return [str(p.relative_to(dump)) for p in sorted(dump.rglob("*")) if p.is_file() and SECRET.encode() in p.read_bytes()]

    r = train(tmp_path / "secret.yaml", "steps=2", env={**TRAIN_ENV, "MY_SECRET": SECRET})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (dump / "checkpoints" / "0000000002").is_dir() and not leaks(), leaks()
    for f in (dump / "config.yaml", dump / "checkpoints" / "0000000002" / "config.yaml"):
        assert yaml.safe_load(f.read_text())["data"]["text_field"] == "${oc.env:MY_SECRET}", f
    assert json.loads((dump / "data.json").read_text())["sources"]["bios"]["text_field"] == "${oc.env:MY_SECRET}"
    r = train(dump / "config.yaml", "steps=4", env={**TRAIN_ENV, "MY_SECRET": SECRET})   # resume from the run's own config
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["step"] == 4 and s["resumed_from"].endswith("0000000002"), s
    assert not leaks(), leaks()
    before = digest(dump)
    r = train(dump / "config.yaml", "steps=6")                                          # the variable is not set
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip() == ("stem-nb train: config key 'data.text_field' (resolve): KeyError raised while resolving "
                                "interpolation: \"Environment variable 'MY_SECRET' not found\""), r.stderr
    assert digest(dump) == before


@pytest.mark.parametrize("cmd", ["export-hf", "import-hf"])
def test_hf_commands_are_wired(cmd):
    "`stem-nb export-hf|import-hf --help` reach stem_nb.hf's parsers."
    r = subprocess.run([sys.executable, "-c", "import sys; from stem_nb.cli import main; sys.exit(main(sys.argv[1:]))", cmd, "--help"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"stem-nb {cmd}" in r.stdout and ("OUT" in r.stdout or "out" in r.stdout)
