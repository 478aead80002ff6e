"""Checkpoints without a training loop: round trip of weights and BOTH optimizers (tables' Adam moments included),
manifest verification and fallback, consolidated export, `load_model`, and import of a reference STEM/Lingua checkpoint."""
import json, shutil, warnings
from pathlib import Path

import pytest, torch

from stem_nb.checkpoint import (CheckpointError, MANIFEST, export_consolidated, import_reference, list_checkpoints,
                                load_checkpoint, load_latest, load_model, save_checkpoint, verify_checkpoint)
from stem_nb.model import Transformer, preset


def tiny(seed=0, ffn_type="stem", **kw):
    return Transformer(preset("debug", ffn_type=ffn_type, stem_layers="all", n_layers=3, seed=seed, **kw))


def optimizers(m, table_optimizer="sparse"):
    "Backbone AdamW and SparseAdamW on the tables (stem_nb.optim)."
    from stem_nb.optim import OptimArgs, build_optimizers
    return build_optimizers(m, m.stem_tables, OptimArgs(lr=1e-2, table_optimizer=table_optimizer))


def step(m, ob, ot, seed):
    x = torch.randint(0, m.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    loss = m(x[:, :-1], x[:, 1:]); loss.backward()
    ob.step(); ob.zero_grad(set_to_none=True)
    if ot is not None: ot.step(); ot.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("ffn_type,table_optimizer", [("stem", "sparse"), ("stem", "dense"), ("dense", "sparse")])
def test_round_trip_restores_optimizer_moments(tmp_path, ffn_type, table_optimizer):
    m = tiny(ffn_type=ffn_type); ob, ot = optimizers(m, table_optimizer)
    for s in range(3): step(m, ob, ot, s)
    ck = save_checkpoint(tmp_path, 3, m, ob, ot, train_state={"tokens": 99, "data": {"step": 3}})
    m2 = tiny(seed=5, ffn_type=ffn_type); ob2, ot2 = optimizers(m2, table_optimizer)
    st = load_checkpoint(ck, m2, ob2, ot2)
    assert st == {"step": 3, "tokens": 99, "data": {"step": 3}}
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k
    if ot is not None:                                               # the reference saves these empty
        for p, p2 in zip(m.stem_tables.parameters(), m2.stem_tables.parameters()):
            s1, s2 = ot.state[p], ot2.state[p2]
            assert set(s1) == set(s2) and s1
            for k in s1:
                if torch.is_tensor(s1[k]): assert torch.equal(s1[k].to_dense() if s1[k].is_sparse else s1[k],
                                                              s2[k].to_dense() if s2[k].is_sparse else s2[k]), k
                else: assert s1[k] == s2[k], k
    for s in range(3, 6): assert step(m, ob, ot, s) == step(m2, ob2, ot2, s)   # bit-identical continuation


def test_nothing_needs_unpickling(tmp_path):
    m = tiny(); ob, ot = optimizers(m); step(m, ob, ot, 0)
    ck = save_checkpoint(tmp_path, 1, m, ob, ot, train_state={"rng": "x"})
    for f in ck.rglob("*.pt"): torch.load(f, weights_only=True)
    for f in ck.glob("*.json"): json.loads(f.read_text())


def test_manifest_catches_corruption_and_load_latest_falls_back(tmp_path):
    m = tiny(); ob, ot = optimizers(m)
    for s in (1, 2, 3): step(m, ob, ot, s); save_checkpoint(tmp_path, s, m, ob, ot, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["0000000002", "0000000003"]
    bad = tmp_path / "0000000003" / "stem_tables" / "slice-000-of-001.pt"
    data = bytearray(bad.read_bytes()); data[len(data) // 2] ^= 0xFF; bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="slice-000-of-001.pt is corrupted"): verify_checkpoint(bad.parent.parent)
    (tmp_path / "0000000004").mkdir()                                 # a folder without a manifest
    msgs = []
    m2 = tiny(1)
    d, st = load_latest(tmp_path, m2, *optimizers(m2), log=msgs.append)
    assert d.name == "0000000002" and st["step"] == 2
    assert "0000000004" in msgs[0] and "MANIFEST.json is missing" in msgs[0]
    assert "slice-000-of-001.pt is corrupted" in msgs[1]


def test_export_and_load_model(tmp_path):
    m = tiny(); ob, ot = optimizers(m); step(m, ob, ot, 0)
    dump = tmp_path / "dump"
    save_checkpoint(dump / "checkpoints", 7, m, ob, ot)
    out = export_consolidated(dump / "checkpoints" / "0000000007", tmp_path / "model.pt")
    obj = torch.load(out, weights_only=True)
    assert set(obj) == {"model_args", "model"} and "stem_tables.1.weight" in obj["model"]
    x = torch.randint(0, m.args.vocab_size, (2, 9))
    with torch.no_grad():
        ref = m(x)
        for src in (out, dump, dump / "checkpoints", dump / "checkpoints" / "0000000007"):
            assert torch.equal(load_model(src)(x), ref), src
    with pytest.raises(CheckpointError, match="not a consolidated"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt"); load_model(tmp_path / "other.pt")


# -- the reference STEM/Lingua checkpoint ------------------------------------------------------------------------
# Assumed layout (documented in nbs/06_checkpoint): a DCP folder whose state dict is {"model": {"lm_transformer.<name>":
# tensor}} plus stem_shards/stem_model_mp{r}.pt = {"stem_embeddings.{layer}.weight": E_layer[:, r*H/P:(r+1)*H/P]}.
# This writer is independent of stem_nb.checkpoint.write_reference_checkpoint on purpose.

def write_reference(model, d: Path, P: int, nest_model: bool = True, with_optim: bool = True):
    import torch.distributed.checkpoint as dcp
    sd = {f"lm_transformer.{k}": v.clone() for k, v in model.state_dict().items() if not k.startswith("stem_tables.")}
    state = {"model": sd} if nest_model else dict(sd)
    if with_optim: state["optim"] = {"state": {"lm_transformer.norm.weight": {"exp_avg": torch.zeros(model.args.dim)}}}
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
