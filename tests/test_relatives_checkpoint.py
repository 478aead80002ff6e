"""STEM's relatives (PLE, value embeddings, Engram-lite, PKM) through checkpoints: a tiny model of each kind trained by the
trainer in this process (experiments/configs/debug.yaml, 6 steps, a checkpoint every 3), resumed from step 3 and
compared with the uninterrupted run, bit for bit; and a relative's tables, never sliced, refused with
`distributed.stem_parallel_size` 2 (in this process, and from the command line on two ranks)."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest, torch

from stem_nb.config import ConfigError
from stem_nb.distributed import DistributedArgs, build_parallel_model
from stem_nb.model import RELATIVE_TYPES, preset
from stem_nb.relatives import build_model
from stem_nb.restore import load_model
from stem_nb.tensor_files import load_tensor_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "debug.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RUN = ["steps=6", "checkpoint.every=3", "checkpoint.keep=0", "eval_every=0", "val_batches=0", "progress=none", "log_every=1",
       "model.stem_layers=1/2"]
SLICE = Path("stem_tables") / "slice-000-of-001.safetensors"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"): monkeypatch.setenv(k, ENV[k])
    for k in ("SLURM_JOB_ID", "SLURM_SUBMIT_DIR", "STEM_NB_SUBMIT_SCRIPT", "WANDB_MODE"): monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(ROOT)


def train_here(dump, *extra):
    "Train the debug config in this process as `stem-nb train CONFIG dump_dir=... RUN extra` does; its summary."
    from stem_nb.train import train
    from stem_nb.train_config import load_train_config
    return train(load_train_config(CONFIG, [f"dump_dir={dump}", *RUN, *extra]), config_file=CONFIG)


def losses(dump) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(dump) / "metrics.jsonl").read_text().splitlines())}


def tensors(obj, prefix="") -> dict:
    "Every tensor of a nested dict (a table slice file), by dotted path."
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict): out.update(tensors(v, f"{prefix}{k}."))
        elif torch.is_tensor(v): out[prefix + k] = v
    return out


@pytest.mark.parametrize("ffn", RELATIVE_TYPES)
def test_resume_of_a_relative_is_bit_identical(tmp_path, ffn):
    a, b = tmp_path / "a", tmp_path / "b"
    sa = train_here(a, f"model.ffn_type={ffn}")
    assert sa["step"] == 6 and sorted(losses(a)) == list(range(1, 7))
    # the interrupted run: the same dump dir as it stood after step 3 (its newest checkpoint 3, metrics up to step 3)
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "0000000006")
    mf = b / "metrics.jsonl"
    mf.write_text("".join(l + "\n" for l in mf.read_text().splitlines() if json.loads(l)["step"] <= 3))
    sb = train_here(b, f"model.ffn_type={ffn}")
    assert sb["step"] == 6 and str(sb["resumed_from"]).endswith("0000000003")
    assert losses(b) == losses(a)                                             # steps 4-6 recomputed, bit for bit
    ma, mb = load_model(a), load_model(b)
    assert type(ma).__name__ == "RelativeTransformer" and ma.args.ffn_type == ffn
    assert {k: tuple(t.weight.shape) for k, t in ma.stem_tables.items()} == ma.table_shapes() != {}
    for k, v in ma.state_dict().items(): assert torch.equal(mb.state_dict()[k], v), k
    # the tables and their optimizer state as saved, whole at their own shapes; the tables trained after step 3
    sa6, sb6, sa3 = (load_tensor_file(d / "checkpoints" / s / SLICE) for d, s in ((a, "0000000006"), (b, "0000000006"), (a, "0000000003")))
    assert sa6["P"] == 1 and set(sa6["optim"]) == set(sa6["tables"]) == set(ma.table_shapes())
    ta, tb = tensors(sa6), tensors(sb6)
    assert set(ta) == set(tb)
    for k, v in ta.items(): assert torch.equal(tb[k], v), k
    for k, w in sa6["tables"].items(): assert not torch.equal(w, sa3["tables"][k]), f"table {k} did not train after step 3"


@pytest.mark.parametrize("ffn", RELATIVE_TYPES)
def test_a_relative_with_stem_parallel_size_2_is_refused(ffn):
    args = preset("debug", ffn_type=ffn, stem_layers="1/2", n_layers=3, vocab_size=256)
    key = next(iter(build_model(args).stem_tables))
    with pytest.raises(ConfigError, match=rf"stem_parallel_size=2: table '{key}' of model.ffn_type='{ffn}' .* is never sliced"):
        build_parallel_model(args, DistributedArgs(stem_parallel_size=2), "cpu")


def test_a_relative_with_stem_parallel_size_2_is_refused_on_two_ranks(tmp_path):
    "torchrun, 2 ranks, P = 2: every rank stops with the ConfigError naming the table before any step or checkpoint."
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "stem_nb.train",
                        str(CONFIG), f"dump_dir={tmp_path / 'run'}", *RUN, "model.ffn_type=ple", "distributed.stem_parallel_size=2"],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode != 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "stem-nb train: ConfigError: distributed.stem_parallel_size=2: table 'ple1' of model.ffn_type='ple'" in r.stderr, r.stderr[-4000:]
    assert f'File "{ROOT / "stem_nb"}' not in r.stderr                 # the message, no traceback of ours (torchrun prints its own)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())

