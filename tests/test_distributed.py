"""Sharded STEM tables + DDP/FSDP2 backbone on CPU with gloo, in real processes (torchrun --standalone).
Each job is tiny (debug preset, 3 layers, V=256, H=192) so a 4-process run fits 2 shared cores."""
import json, os, subprocess, sys
from pathlib import Path

import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "stem_worker.py"
sys.path.insert(0, str(SCRIPT.parent))
import stem_worker as W  # noqa: E402

from stem_nb.config import ConfigError
from stem_nb.checkpoint import ckpt_name
from stem_nb.restore import export_consolidated, load_model
from stem_nb.tensor_files import load_tensor_file
from stem_nb.distributed import (DistributedArgs, StemLayout, ShardedStemLookup, init_distributed, make_layout, stem_groups,
                                 stem_comm_bytes, wrap_backbone)
from stem_nb.model import Transformer, preset

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(n, *args, timeout=240, script=SCRIPT, **env):
    "Run `script CASE OUT_DIR ...` on `n` ranks; returns OUT_DIR/CASE.json (None if the script wrote none)."
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={n}", str(script), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **env}, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    out = Path(args[1]) / f"{args[0]}.json"
    return json.loads(out.read_text()) if out.exists() else None


@pytest.fixture(scope="module")
def ref():
    "The single-process run on the same global batch: losses and grad norms of STEPS + 2 steps."
    return W.reference()


# -- no processes ------------------------------------------------------------------------------------------------

def test_bad_P_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not divide the world size 6"): stem_groups(6, 4)
    with pytest.raises(ConfigError, match="does not divide the STEM hidden dim H=192"):
        ShardedStemLookup(Transformer(W.model_args()), StemLayout(5, 0, 5))
    with pytest.raises(ConfigError, match="stem_parallel_size must be >= 1"): DistributedArgs(stem_parallel_size=0)


def test_groups_layout():
    stem, rep = stem_groups(8, 4)
    assert stem == [[0, 1, 2, 3], [4, 5, 6, 7]] and rep == [[0, 4], [1, 5], [2, 6], [3, 7]]
    lay = StemLayout(8, 6, 4)
    assert (lay.group_index, lay.slice_index, lay.n_replicas) == (1, 2, 2)


def test_comm_bytes_paper_1b():
    a = preset("paper-1b", ffn_type="stem")
    c = stem_comm_bytes(a, 4096, 4, world=64)
    assert c["a2a_fwd"] == 3 * 4096 * 2048 * 4 and c["ids_allgather"] == 3 * 4096 * 8
    assert c["stem_total"] == c["ids_allgather"] + 2 * c["a2a_fwd"] and c["replica_sync"] > 0


def test_stem_parallel_size_larger_than_one_process_is_refused():
    "distributed.stem_parallel_size=5 on one process used to be ignored silently; now it is a ConfigError."
    with pytest.raises(ConfigError, match="stem_parallel_size=5 does not divide the world size 1.*1 for a single process"):
        init_distributed(DistributedArgs(stem_parallel_size=5))


def test_stem_parallel_size_refused_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stem_nb.train", str(CONFIG), f"dump_dir={tmp_path / 'run'}",
                        "distributed.stem_parallel_size=5", *TRAIN_OVR], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-4000:]
    assert "stem_parallel_size=5 does not divide the world size 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_backbone_none_refused_with_many_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="backbone=none with 2 ranks"):
        wrap_backbone(Transformer(W.model_args()), DistributedArgs(backbone="none"))


# -- real processes ----------------------------------------------------------------------------------------------

# (4, 2): two replicas per slice, synced by the dense all-reduce path here; the sparse path is what the training test uses
@pytest.mark.parametrize("n,P,backbone,mode", [(2, 2, "ddp", "auto"), (4, 2, "ddp", "dense"), (4, 4, "fsdp", "auto")])
def test_sharded_grads_equal_single_process(tmp_path, n, P, backbone, mode):
    res = torchrun(n, "grads", tmp_path, P, backbone, SYNC_MODE=mode)
    loss, ref = W.reference_grads()
    assert abs(res["loss"] - loss) < 1e-5
    got = torch.load(tmp_path / "grads.pt", weights_only=True)   # torch.load, justified: tensors the worker just wrote
    assert set(got) == set(ref)
    for k in ref: torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


def test_world4_P2_replicas_identical_and_loss_curve_matches(tmp_path, ref):
    res = torchrun(4, "train", tmp_path, 2, "ddp")
    assert res["replica_maxdiff"] == 0.0 and res["backbone_maxdiff"] == 0.0
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref[0][:W.STEPS]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(res["norms"]), torch.tensor(ref[1][:W.STEPS]), rtol=1e-4, atol=1e-5)
    assert max(res["norms"]) > W.MAX_NORM    # the clip was active


def test_save_world2_P2_resume_world1_and_world4_P4(tmp_path, ref):
    ck = tmp_path / "ckpt"
    saved = torchrun(2, "save", tmp_path, 2, "ddp", ck)
    want = ref[0][W.STEPS:W.STEPS + 2]
    torch.testing.assert_close(torch.tensor(saved["next_losses"]), torch.tensor(want), rtol=1e-5, atol=1e-5)
    for n, P, bb in ((1, 1, "ddp"), (4, 4, "fsdp")):     # DDP-saved backbone resumed into FSDP2 at world 4
        out = tmp_path / f"w{n}"; out.mkdir()
        got = torchrun(n, "resume", out, P, bb, ck)
        # first: the restored weights (same next-step loss); second: the restored Adam moments (same step after)
        torch.testing.assert_close(torch.tensor(got["next_losses"]), torch.tensor(want), rtol=1e-5, atol=1e-5)
    # consolidated single file -> a plain Transformer evaluates the same next-step loss
    f = export_consolidated(ck / ckpt_name(W.STEPS), tmp_path / "full.safetensors")
    m = Transformer(W.model_args()); m.load_state_dict(load_tensor_file(f)["model"], strict=True)
    x, y = W.batch(W.STEPS)
    with torch.no_grad(): assert abs(m(x, y).item() - want[0]) < 1e-5
    with torch.no_grad(): assert abs(load_model(ck)(x, y).item() - want[0]) < 1e-5     # the checkpoints/ folder itself


# -- the training entry point under torchrun ---------------------------------------------------------------------

CONFIG = ROOT / "experiments" / "configs" / "debug.yaml"
TRAIN_OVR = ["steps=3", "val_batches=0", "checkpoint.every=0", "log_every=1"]


def _metrics(d): return [json.loads(l) for l in (Path(d) / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("backbone", ["ddp", "fsdp"])
def test_torchrun_train_matches_single_process(tmp_path, backbone):
    "`torchrun --nproc-per-node 2 -m stem_nb.train CONFIG key=value` at P=2 = one process on the same global batch."
    one, two = tmp_path / "w1", tmp_path / "w2"
    r = subprocess.run([sys.executable, "-m", "stem_nb.train", str(CONFIG), f"dump_dir={one}", "data.batch_size=4", *TRAIN_OVR],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "stem_nb.train",
                        str(CONFIG), f"dump_dir={two}", "data.batch_size=2", "distributed.stem_parallel_size=2",
                        f"distributed.backbone={backbone}", *TRAIN_OVR], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    a, b = _metrics(one), _metrics(two)
    assert [x["step"] for x in b] == [1, 2, 3] and [x["tokens"] for x in a] == [x["tokens"] for x in b]
    torch.testing.assert_close(torch.tensor([x["loss"] for x in b]), torch.tensor([x["loss"] for x in a]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([x["grad_norm"] for x in b]), torch.tensor([x["grad_norm"] for x in a]), rtol=1e-4, atol=1e-5)
    # the world-2 / P=2 checkpoint loads as one full model for single-process evaluation
    m1, m2 = load_model(one), load_model(two)
    # (Adam divides by sqrt(v): a near-zero gradient summed in another order moves a weight by up to ~lr * 1e-2)
    for k, v in m1.state_dict().items(): torch.testing.assert_close(m2.state_dict()[k], v, rtol=1e-4, atol=1e-4, msg=k)
