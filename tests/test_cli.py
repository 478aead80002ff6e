"Crosses notebooks: the console script, the model family end to end, accounting vs instantiated models."
import json, math, os, subprocess, sys
from pathlib import Path

import pytest, torch

from stem_nb.cli import main
from stem_nb.flops import count_params, params_table
from stem_nb.model import FFN_TYPES, ModelArgs, Transformer, preset
from stem_nb.config import ConfigError, load_config

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


def test_bench_runs_one_in_a_fresh_process_as_json():
    "`stem-nb bench NAME key=value`: one JSON line per result from a fresh process, a paired ratio in each; a bad argument is a JSON error line."
    r = subprocess.run([str(BIN / "stem-nb"), "bench", "fwd_bwd", "model_preset=debug", "batch=2", "seq_len=32",
                        "warmup=1", "rounds=2"], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert lines and all(l["benchmark"] == "fwd_bwd" and "error" not in l and "skipped" not in l for l in lines), lines
    assert all(any(k.startswith("paired_ratio") for k in l) for l in lines), lines
    r = subprocess.run([str(BIN / "stem-nb"), "bench", "fwd_bwd", "no_such_arg=1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    (line,) = [json.loads(l) for l in r.stdout.splitlines()]
    assert line["benchmark"] == "fwd_bwd" and "no_such_arg" in line["error"], line
    r = subprocess.run([str(BIN / "stem-nb"), "bench", "nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown benchmark 'nope'" in r.stderr


def test_gpu_check_dry_run_prints_every_section(tmp_path):
    "scripts/gpu_check.sh --dry-run: every section at tiny dims on the CPU, the table last, within a minute or so."
    import time
    t0 = time.time()
    r = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--json", str(tmp_path / "rows.json")],
                       capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    took = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {x["section"] for x in rows} == {"train", "decode", "offload", "fsdp"}
    assert not [x for x in rows if x["item"] == "-"], rows                 # no section failed
    for x in rows:
        if x["item"].endswith("tokens/s"): assert float(x["value"]) > 0, x
    table = r.stdout.strip().splitlines()
    assert table[-len(rows) - 2].startswith("section | item") and "FSDP2 STEM 1/3 tokens/s" in table[-1]
    assert took < 120, f"gpu_check --dry-run took {took:.0f} s"
