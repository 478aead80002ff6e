"""`stem-nb bench` (nbs/28_bench): each benchmark at toy sizes returns its JSON rows with the peers in them, and the
command runs one benchmark in a fresh process. What the numbers are is measured by `stem-nb bench`, not here."""
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import json, subprocess, sys
from pathlib import Path

import numpy as np

from stem_nb.bench import bench_decode, bench_offload, bench_optim
from stem_nb.table_adamw import zipf_tokens

BIN = Path(sys.executable).parent


def test_bench_decode_small():
    r = bench_decode("debug", prompt_len=8, new_tokens=4, batches=(1, 2), rounds=1)
    assert [d["batch"] for d in r] == [1, 2]
    for d in r:
        assert set(d["median_tok/s"]) == {"stem_nb_stem", "stem_nb_dense", "hf_generate"}
        assert set(d["paired_ratio"]) == {"stem_nb_dense_vs_hf_generate", "stem_nb_stem_vs_hf_generate", "stem_nb_stem_vs_stem_nb_dense"}


def test_bench_offload_rows_are_json():
    toks = np.minimum(np.random.default_rng(1).zipf(1.2, 4000), 100277) - 1
    rows = bench_offload(fracs=(0.1,), max_eval_tokens=200, decode_tokens=8, prefill_shape=(2, 8), cost_prefill_shape=(2, 8),
                         tokens=toks, vocab_size=100277, rounds=1)
    assert {r["bench"] for r in rows} == {"offload_hit_rate", "offload_cost", "offload_paper_scale"}
    cost = [r for r in rows if r["bench"] == "offload_cost"]
    assert [r["config"] for r in cost] == ["cache_10pct", "no_cache"] and cost[1]["decode_hit_rate"] == 0.0
    json.loads(json.dumps(rows))


def test_bench_optim_small():
    r = bench_optim(V=200_000, H=64, n_tokens=256, rounds=3, threads=1, which=("exact", "row_local", "adamw_fused", "sparse_adam"))
    assert set(r["median_ms"]) == {"exact", "row_local", "adamw_fused", "sparse_adam"}
    assert r["unique_rows"] == round(sum(zipf_tokens(256, 200_000, seed=i).unique().numel() for i in range(4)) / 4)
    assert r["sparse_bytes"] == (256 + 6 * r["unique_rows"]) * 64 * 4 and r["dense_bytes"] == 7 * 200_000 * 64 * 4
    assert r["paired_ratio"]["exact_vs_adamw_fused"] > 1          # 200k rows vs ~100: the sparse step must win


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
