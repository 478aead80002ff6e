"""Checkpoints without a training loop: round trip of weights and the one optimizer (tables' Adam moments included),
manifest verification and fallback, consolidated export, `load_model`, and import of a reference STEM/Lingua checkpoint.
Crafted (code-running) checkpoints and disk-full saves: tests/test_faults_checkpoint.py."""
import json, os, shutil, warnings
from pathlib import Path

import pytest, torch
from torch.distributed.checkpoint.api import CheckpointException

import stem_nb.checkpoint as checkpoint
import stem_nb.restore as restore
from stem_nb.checkpoint import (CheckpointError, MANIFEST, OPTIMIZER_HPARAMS, REPLACED_DIR, list_checkpoints, pin_checkpoint,
                                prune_checkpoints, save_checkpoint, verify_checkpoint, write_manifest)
from stem_nb.restore import export_consolidated, import_reference, load_checkpoint, load_latest, load_model, resolve_checkpoint
from stem_nb.tensor_files import load_tensor_file, read_dcp_metadata
from stem_nb.model import Transformer, preset
from stem_nb.optim import OptimArgs, ModelOptimizer


def tiny(seed=0, ffn_type="stem", **kw):
    return Transformer(preset("debug", ffn_type=ffn_type, stem_layers="all", n_layers=3, seed=seed, **kw))


def optimizer(m, table_optimizer=None):
    "The project's one optimizer (stem_nb.optim.ModelOptimizer); `table_optimizer` None: OptimArgs' default."
    kw = {} if table_optimizer is None else {"table_optimizer": table_optimizer}
    return ModelOptimizer(m, OptimArgs(lr=1e-2, warmup=0, **kw), total_steps=20)


def step(m, opt, seed):
    x = torch.randint(0, m.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    opt.settle(x[:, :-1].unique())
    loss = m(x[:, :-1], x[:, 1:]); loss.backward()
    opt.step(); opt.zero_grad()
    return loss.item()


def _dense(t): return t.to_dense() if t.is_sparse else t


TABLE_MODES = [None, "row_local", "dense"]   # the default (exact), the old row-local SparseAdamW, the reference dense AdamW


@pytest.mark.parametrize("ffn_type,table_optimizer", [("stem", m) for m in TABLE_MODES] + [("dense", None)])
def test_round_trip_restores_optimizer_moments(tmp_path, ffn_type, table_optimizer):
    m = tiny(ffn_type=ffn_type); opt = optimizer(m, table_optimizer)
    for s in range(3): step(m, opt, s)
    ck = save_checkpoint(tmp_path, 3, m, opt, train_state={"tokens": 99, "data": {"step": 3}})
    m2 = tiny(seed=5, ffn_type=ffn_type); opt2 = optimizer(m2, table_optimizer)
    st = load_checkpoint(ck, m2, opt2)
    assert st == {"step": 3, "tokens": 99, "data": {"step": 3}}
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k
    if opt.tables is not None:
        for p, p2 in zip(m.stem_tables.parameters(), m2.stem_tables.parameters()):
            s1, s2 = opt.tables.state[p], opt2.tables.state[p2]
            assert set(s1) == set(s2) and s1
            for k in s1:
                if torch.is_tensor(s1[k]): assert torch.equal(_dense(s1[k]), _dense(s2[k])), k
                else: assert s1[k] == s2[k], k
    for s in range(3, 6): assert step(m, opt, s) == step(m2, opt2, s)   # bit-identical continuation


def test_hyperparameters_travel_as_json_not_pickle(tmp_path):
    m = tiny(); opt = optimizer(m); step(m, opt, 0)
    ck = save_checkpoint(tmp_path, 1, m, opt)
    saved = json.loads((ck / "train_state_00000.json").read_text())[OPTIMIZER_HPARAMS]
    assert saved == json.loads(json.dumps(opt.hparams()))
    meta = read_dcp_metadata(ck / "backbone").state_dict_metadata
    assert not [k for k, v in meta.items() if not hasattr(v, "size")]          # no bytes items at all
    assert not [k for k in meta if "param_groups" in k]
    # a checkpoint's hyperparameters come back with it (the trainer may then override them from its config)
    m2 = tiny(1); opt2 = ModelOptimizer(m2, OptimArgs(lr=5e-1, weight_decay=0.0, warmup=0), total_steps=20)
    load_checkpoint(ck, m2, opt2)
    assert json.loads(json.dumps(opt2.hparams())) == saved


def test_nothing_needs_unpickling(tmp_path):
    "Outside DCP's backbone folder (DCP keeps its format, read by the guarded unpickler) no file is a pickle or a torch archive."
    m = tiny(); opt = optimizer(m); step(m, opt, 0)
    ck = save_checkpoint(tmp_path, 1, m, opt, train_state={"rng": "x"})
    outside = [f for f in ck.rglob("*") if f.is_file() and "backbone" not in f.relative_to(ck).parts]
    assert sorted(f.relative_to(ck).as_posix() for f in outside) == ["MANIFEST.json", "model_args.json",
                                                                       "stem_tables/slice-000-of-001.safetensors", "train_state_00000.json"]
    for f in outside: assert f.read_bytes()[:2] not in (b"PK", b"\x80\x02") and f.read_bytes()[:1] != b"\x80", f
    assert set(load_tensor_file(ck / "stem_tables" / "slice-000-of-001.safetensors")) == {"P", "slice", "vocab", "hidden", "tables", "optim"}
    for f in ck.glob("*.json"): json.loads(f.read_text())
    read_dcp_metadata(ck / "backbone")


def test_manifest_catches_corruption_and_load_latest_falls_back(tmp_path):
    m = tiny(); opt = optimizer(m)
    for s in (1, 2, 3): step(m, opt, s); save_checkpoint(tmp_path, s, m, opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["0000000002", "0000000003"]
    bad = tmp_path / "0000000003" / "stem_tables" / "slice-000-of-001.safetensors"
    data = bytearray(bad.read_bytes()); data[len(data) // 2] ^= 0xFF; bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="slice-000-of-001.safetensors is corrupted"): verify_checkpoint(bad.parent.parent)
    (tmp_path / "0000000004").mkdir()                                 # a folder without a manifest
    msgs = []
    m2 = tiny(1)
    d, st = load_latest(tmp_path, m2, optimizer(m2), log=msgs.append)
    assert d.name == "0000000002" and st["step"] == 2
    assert "0000000004" in msgs[0] and "MANIFEST.json is missing" in msgs[0]
    assert "slice-000-of-001.safetensors is corrupted" in msgs[1]


# -- the manifest read as untrusted input --------------------------------------------------------------------------

MALFORMED = {   # name -> (the manifest's new content from the good one, what the refusal says)
    "a list": (lambda m: [m], "it holds a JSON list, not an object"),
    "no files": (lambda m: {"format": "stem-nb/1", "step": 2}, "no 'files' object"),
    "files a list": (lambda m: {"format": "stem-nb/1", "files": list(m["files"])}, "'files' is a JSON list, not an object"),
    "entry without size": (lambda m: {"format": "stem-nb/1", "files": {k: {"sha256": v["sha256"]} for k, v in m["files"].items()}}, "has no 'size'"),
    "entry without sha256": (lambda m: {"format": "stem-nb/1", "files": {k: {"size": v["size"]} for k, v in m["files"].items()}}, "has no 'sha256'"),
    "entry a string": (lambda m: {"format": "stem-nb/1", "files": {k: "x" for k in m["files"]}}, "is a JSON str, not an object"),
    "size a string": (lambda m: {"format": "stem-nb/1", "files": {k: {**v, "size": str(v["size"])} for k, v in m["files"].items()}}, "not a byte count"),
    "sha256 a number": (lambda m: {"format": "stem-nb/1", "files": {k: {**v, "sha256": 7} for k, v in m["files"].items()}}, "not 64 hex digits"),
    "path outside": (lambda m: {"format": "stem-nb/1", "files": {"../../etc/hostname": {"size": 1, "sha256": "0" * 64}}}, "is not a path inside the checkpoint"),
    "step a string": (lambda m: {**{k: v for k, v in m.items() if k != "self_sha256"}, "format": "stem-nb/1", "step": "2"}, "'step' is '2'"),
    "unknown format": (lambda m: {k: v for k, v in m.items() if k != "self_sha256"} | {"format": "stem-nb/9"}, "format 'stem-nb/9' is not one of"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_manifest_that_is_json_but_not_a_manifest_is_a_checkpoint_error(tmp_path, case):
    m = tiny(); ck = save_checkpoint(tmp_path, 2, m)
    make, want = MALFORMED[case]
    (ck / MANIFEST).write_text(json.dumps(make(json.loads((ck / MANIFEST).read_text()))))
    with pytest.raises(CheckpointError) as err: verify_checkpoint(ck)
    assert str(err.value).startswith(f"{ck / MANIFEST} is not a valid stem-nb manifest (") and want in str(err.value), err.value


def test_a_malformed_newest_manifest_is_skipped_by_every_reader(tmp_path):
    "load_latest (resume) and resolve_checkpoint (eval, load_model) fall back past it and name it."
    m = tiny()
    for s in (1, 2): save_checkpoint(tmp_path, s, m)
    (tmp_path / "0000000002" / MANIFEST).write_text(json.dumps({"format": "stem-nb/1", "files": {"model_args.json": {"size": 3}}}))
    msgs = []
    assert load_latest(tmp_path, tiny(1), log=msgs.append)[0].name == "0000000001"
    assert "0000000002/MANIFEST.json is not a valid stem-nb manifest (entry 'model_args.json' has no 'sha256')" in msgs[0]
    assert resolve_checkpoint(tmp_path).name == "0000000001"


def test_the_manifest_covers_its_own_fields(tmp_path):
    m = tiny(); ck = save_checkpoint(tmp_path, 2, m)
    good = (ck / MANIFEST).read_text()
    man = json.loads(good)
    assert man["format"] == "stem-nb/2" and len(man["self_sha256"]) == 64 and verify_checkpoint(ck)["step"] == 2
    for field, value in (("step", 3), ("world_size", 2), ("created", man["created"] + 1), ("format", "stem-nb/1")):
        (ck / MANIFEST).write_text(json.dumps({**man, field: value}, indent=1))
        with pytest.raises(CheckpointError, match=f"{ck / MANIFEST} is corrupted: its self_sha256 does not match its other fields"):
            verify_checkpoint(ck)
    i = good.index('"step": 2') + len('"step": ')                    # one flipped byte in a field no file hash covers
    (ck / MANIFEST).write_text(good[:i] + "3" + good[i + 1:])
    with pytest.raises(CheckpointError, match="self_sha256 does not match"): verify_checkpoint(ck)
    # a manifest of an earlier version (stem-nb/1, no self_sha256) still verifies
    (ck / MANIFEST).write_text(json.dumps({k: v for k, v in man.items() if k != "self_sha256"} | {"format": "stem-nb/1"}))
    assert verify_checkpoint(ck)["step"] == 2
    # write_manifest given an old manifest's fields (as tools that re-sign a checkpoint do) signs anew
    write_manifest(ck, **{k: v for k, v in man.items() if k not in ("format", "created", "files")})
    assert verify_checkpoint(ck)["self_sha256"] != man["self_sha256"]


def test_saving_a_step_again_moves_the_old_one_aside(tmp_path, monkeypatch):
    m = tiny(); opt = optimizer(m); step(m, opt, 0)
    old = save_checkpoint(tmp_path, 2, m, opt)
    before = {p.relative_to(old).as_posix(): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    step(m, opt, 1)
    new = save_checkpoint(tmp_path, 2, m, opt, keep=1)
    aside = tmp_path / REPLACED_DIR / "0000000002-1"
    assert {p.relative_to(aside).as_posix(): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == before
    assert [p.name for p in list_checkpoints(tmp_path)] == ["0000000002"] and verify_checkpoint(new)
    prune_checkpoints(tmp_path, 1)
    assert aside.is_dir()                                             # pruning never touches what was moved aside
    monkeypatch.setattr(checkpoint, "REPLACE_WAIT_S", 0.3)
    with pin_checkpoint(new):                                         # a live reader: the save waits, then fails naming it
        with pytest.raises(CheckpointError, match=rf"checkpoint {new} is being read by process {os.getpid()}"):
            save_checkpoint(tmp_path, 2, m, opt)
        assert not [n for n in os.listdir(new) if n.startswith(".pruning-")] and verify_checkpoint(new)   # untouched, no mark left
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPLACED_DIR, "0000000002"]           # no temp folder left


def test_load_latest_falls_back_past_dcp_checkpoint_exception(tmp_path, monkeypatch):
    "DCP's CheckpointException is a BaseException: `except Exception` misses it. load_latest must still fall back."
    m = tiny(); opt = optimizer(m)
    for s in (1, 2): step(m, opt, s); save_checkpoint(tmp_path, s, m, opt)
    real = restore.load_checkpoint
    def flaky(d, *a, **kw):
        if Path(d).name == "0000000002": raise CheckpointException("raw DCP failure", {0: (OSError("disk gone"), None)})
        return real(d, *a, **kw)
    monkeypatch.setattr(restore, "load_checkpoint", flaky)
    msgs = []
    m2 = tiny(1)
    d, st = restore.load_latest(tmp_path, m2, optimizer(m2), log=msgs.append)
    assert (d.name, st["step"]) == ("0000000001", 1) and "0000000002" in msgs[0] and "disk gone" in msgs[0]
    # and data that is not what DCP wrote (manifest rewritten to match zeroed data) is a CheckpointError naming the file
    monkeypatch.setattr(restore, "load_checkpoint", real)
    f = next((tmp_path / "0000000002" / "backbone").glob("*.distcp"))
    f.write_bytes(b"\0" * f.stat().st_size); checkpoint.write_manifest(tmp_path / "0000000002", step=2)
    with pytest.raises(CheckpointError, match=r"0000000002/backbone/__0_0.distcp \(entry '.*'\) is not a torch zip archive"):
        load_checkpoint(tmp_path / "0000000002", tiny(1))


def test_temp_folders_are_per_process_and_only_dead_ones_are_pruned(tmp_path):
    live = tmp_path / f".tmp-0000000005-{os.getpid()}-00ff"
    dead = tmp_path / ".tmp-0000000005-999999999-00ff"              # beyond pid_max: no such process
    legacy = tmp_path / ".tmp-0000000004"                             # the old, shared name: a killed save
    for p in (live, dead, legacy): p.mkdir()
    m = tiny(); opt = optimizer(m)
    save_checkpoint(tmp_path, 5, m, opt)                               # the same step as the live temp folder
    assert live.is_dir() and not dead.exists() and not legacy.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["0000000005"]
    prune_checkpoints(tmp_path, 0)
    assert live.is_dir()


def test_export_and_load_model(tmp_path):
    m = tiny(); opt = optimizer(m); step(m, opt, 0)
    dump = tmp_path / "dump"
    save_checkpoint(dump / "checkpoints", 7, m, opt)
    out = export_consolidated(dump / "checkpoints" / "0000000007", tmp_path / "model.safetensors")
    obj = load_tensor_file(out)
    assert set(obj) == {"model_args", "model"} and "stem_tables.1.weight" in obj["model"]
    x = torch.randint(0, m.args.vocab_size, (2, 9))
    with torch.no_grad():
        ref = m(x)
        for src in (out, dump, dump / "checkpoints", dump / "checkpoints" / "0000000007"):
            assert torch.equal(load_model(src)(x), ref), src
    with pytest.raises(CheckpointError, match="not a consolidated"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt"); load_model(tmp_path / "other.pt")


# -- the reference STEM/Lingua checkpoint ------------------------------------------------------------------------
# Assumed layout (documented in nbs/14_checkpoint): a DCP folder whose state dict is {"model": {"lm_transformer.<name>":
# tensor}} plus stem_shards/stem_model_mp{r}.pt = {"stem_embeddings.{layer}.weight": E_layer[:, r*H/P:(r+1)*H/P]}.
# This writer is independent of stem_nb.restore.write_reference_checkpoint on purpose.

def write_reference(model, d: Path, P: int, nest_model: bool = True, with_optim: bool = True):
    import torch.distributed.checkpoint as dcp
    sd = {f"lm_transformer.{k}": v.clone() for k, v in model.state_dict().items() if not k.startswith("stem_tables.")}
    state = {"model": sd} if nest_model else dict(sd)
    if with_optim:   # as Lingua writes it: moments, and param_groups as DCP bytes items (never read by the import)
        state["optim"] = {"state": {"lm_transformer.norm.weight": {"exp_avg": torch.zeros(model.args.dim)}},
                          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": ["lm_transformer.norm.weight"]}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); dcp.save(state, checkpoint_id=str(d))
    a = dict(model.args.__dict__); a["max_seqlen"] = a.pop("max_seq_len")
    for k in ("ffn_type", "stem_layers", "seed"): a.pop(k)
    (d / "params.json").write_text(json.dumps({"name": "ref", "model": a}))
    (d / "stem_shards").mkdir()
    h = model.args.hidden_dim // P
    for r in range(P):
        torch.save({f"stem_embeddings.{k}.weight": t.weight.detach()[:, r * h:(r + 1) * h].clone()
                    for k, t in model.stem_tables.items()}, d / "stem_shards" / f"stem_model_mp{r}.pt")


@pytest.mark.parametrize("P,nest", [(1, True), (2, True), (4, False)])
def test_import_reference_checkpoint(tmp_path, P, nest):
    m = tiny(seed=11)
    with torch.no_grad():                                            # make the tables distinguishable from init
        for t in m.stem_tables.values(): t.weight.add_(torch.randn_like(t.weight))
    write_reference(m, tmp_path / "ref", P, nest_model=nest)
    got = import_reference(tmp_path / "ref")                          # model args from params.json + shard keys
    assert got.args.table_layers == m.args.table_layers
    x = torch.randint(0, m.args.vocab_size, (2, 12))
    with torch.no_grad(): assert torch.equal(got(x), m(x))


def test_import_reference_errors_name_the_file(tmp_path):
    m = tiny()
    write_reference(m, tmp_path / "ref", 2)
    (tmp_path / "ref" / "stem_shards" / "stem_model_mp1.pt").unlink()
    torch.save({"stem_embeddings.1.weight": torch.zeros(1)}, tmp_path / "ref" / "stem_shards" / "stem_model_mp3.pt")
    with pytest.raises(CheckpointError, match="model-parallel ranks"): import_reference(tmp_path / "ref")
    with pytest.raises(CheckpointError, match="not a DCP checkpoint"): import_reference(tmp_path)
