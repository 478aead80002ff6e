"""No pickle in what stem-nb writes: table slices, their optimizer state and consolidated exports are
safetensors (`save_tensor_file`), read back by `load_tensor_file` through `read_safetensors_header`, which checks the
header (length, dtypes, shapes, byte ranges, overlaps, gaps, duplicate keys, the stem-nb tree) before the
`safetensors` library opens the file. Files of earlier versions (`torch.save` archives) still load through the same
reader. Command-line cases (eval of a crafted slice, resume from an old-format checkpoint): tests/test_faults_checkpoint.py."""
import json, os
from pathlib import Path

import pytest, torch
from safetensors.torch import save_file

import stem_nb.tensor_files as tensor_files
from stem_nb.checkpoint import MANIFEST, TABLE_DIR, save_checkpoint, table_slices, verify_checkpoint
from stem_nb.files import sha256_file
from stem_nb.restore import export_consolidated, load_model, load_table_shards
from stem_nb.tensor_files import (CheckpointError, SAFETENSORS_MAX_HEADER, load_tensor_file, read_safetensors_header,
                                  save_tensor_file)
from stem_nb.distributed import StemLayout
from stem_nb.model import Transformer, preset
from stem_nb.optim import OptimArgs, ModelOptimizer


def tiny(seed=0):
    return Transformer(preset("debug", ffn_type="stem", stem_layers="all", n_layers=3, seed=seed))


def trained_checkpoint(root: Path, steps: int = 2):
    "A checkpoint of a tiny STEM model after `steps` optimizer steps (the table optimizer's state is populated)."
    m = tiny(); opt = ModelOptimizer(m, OptimArgs(lr=1e-2, warmup=0), total_steps=10)
    for s in range(steps):
        x = torch.randint(0, m.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(s))
        opt.settle(x.unique()); m(x, x).backward(); opt.step(); opt.zero_grad()
    return m, opt, save_checkpoint(root, steps, m, opt)


def to_old_format(ck: Path) -> Path:
    """Rewrite checkpoint `ck` as earlier versions wrote it: each table slice the same dict written with torch.save
    (`slice-SSS-of-PPP.pt`), and a "stem-nb/1" MANIFEST.json without `self_sha256`."""
    for f in table_slices(ck)[1]:
        torch.save(load_tensor_file(f), f.with_suffix(".pt")); f.unlink()
    man = json.loads((ck / MANIFEST).read_text())
    files = {p.relative_to(ck).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(ck.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ck / MANIFEST).write_text(json.dumps({"format": "stem-nb/1", "created": man["created"], "step": man["step"],
                                           "world_size": man["world_size"], "files": files}, indent=1))
    return ck


def _header(good: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(good[:8], "little")
    return json.loads(good[8:8 + n]), good[8 + n:]


def rewrite_header(f: Path, good: bytes, edit) -> Path:
    "Write the safetensors bytes `good` to `f` with its JSON header changed by `edit(header)`, the data unchanged."
    hdr, data = _header(good)
    edit(hdr)
    h = json.dumps(hdr).encode()
    f.write_bytes(len(h).to_bytes(8, "little") + h + data)
    return f


@pytest.fixture
def no_library(monkeypatch):
    "The safetensors library must not open a refused file: any call fails the test."
    def reached(*a, **k): raise AssertionError("safe_open was reached for a file the header check should refuse")
    monkeypatch.setattr(tensor_files, "safe_open", reached)


# -- what is written ------------------------------------------------------------------------------------------------

def test_checkpoint_tables_are_safetensors_and_round_trip_exactly(tmp_path):
    m, opt, ck = trained_checkpoint(tmp_path)
    (f,) = table_slices(ck)[1]
    assert f.name == "slice-000-of-001.safetensors" and not list(ck.rglob("*.pt"))
    assert f.read_bytes()[:2] != b"PK" and f.read_bytes()[8:9] == b"{"           # not a torch archive: a JSON header
    entries, meta = read_safetensors_header(f)
    assert {"tables.1", "optim.1.exp_avg", "optim.1.row_step", "optim.1.step"} <= set(entries)
    assert json.loads(meta["stem-nb.tree"])["tree"]["P"] == 1
    obj = load_tensor_file(f)
    assert (obj["P"], obj["slice"], obj["vocab"], obj["hidden"]) == (1, 0, m.args.vocab_size, m.args.hidden_dim)
    for name, t in m.stem_tables.items():
        assert torch.equal(obj["tables"][name], t.weight.detach())
        st = opt.tables.state[t.weight]
        assert set(obj["optim"][name]) == set(st)
        for k, v in st.items():
            assert obj["optim"][name][k].dtype == v.dtype and torch.equal(obj["optim"][name][k], v), (name, k)
    assert obj["optim"]["1"]["step"].dtype == torch.int64 and int(obj["optim"]["1"]["step"]) == 2
    assert oct(f.stat().st_mode & 0o777) == oct((ck / "model_args.json").stat().st_mode & 0o777)     # not safetensors' 0600


def test_integers_round_trip_exactly(tmp_path):
    big = 2**53 + 1                                                   # not representable in float64
    obj = {"step": torch.tensor(big), "n": 2**62 + 3, "x": 0.1, "flags": [True, None, "s"], "deep": {"a": {"b": torch.ones(2, dtype=torch.int32)}}}
    got = load_tensor_file(save_tensor_file(tmp_path / "t.safetensors", obj))
    assert got["step"].dtype == torch.int64 and int(got["step"]) == big
    assert (got["n"], got["x"], got["flags"]) == (2**62 + 3, 0.1, [True, None, "s"])
    assert torch.equal(got["deep"]["a"]["b"], obj["deep"]["a"]["b"])


def test_what_safetensors_cannot_hold_is_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match="sparse"):
        save_tensor_file(tmp_path / "a.safetensors", {"m": torch.eye(3).to_sparse()})
    with pytest.raises(TypeError, match="key 1 cannot be stored"):
        save_tensor_file(tmp_path / "b.safetensors", {"optim": {1: torch.ones(1)}})
    with pytest.raises(ValueError, match="Out of range float values"):
        save_tensor_file(tmp_path / "c.safetensors", {"lr": float("nan")})
    w = torch.ones(4)                                                  # the same tensor twice (tied weights): stored twice
    got = load_tensor_file(save_tensor_file(tmp_path / "d.safetensors", {"a": w, "b": w}))
    assert torch.equal(got["a"], w) and torch.equal(got["b"], w)
    assert not any(tmp_path.glob("[abc].safetensors"))


def test_consolidated_export_is_safetensors_and_loads(tmp_path):
    m, _, ck = trained_checkpoint(tmp_path / "checkpoints")
    out = export_consolidated(ck, tmp_path / "model.safetensors")
    entries, _ = read_safetensors_header(out)
    assert set(entries) == {f"model.{k}" for k in m.state_dict()}
    assert load_tensor_file(out)["model_args"]["dim"] == m.args.dim
    x = torch.randint(0, m.args.vocab_size, (2, 9))
    with torch.no_grad(): assert torch.equal(load_model(out)(x), m(x))


# -- earlier versions -----------------------------------------------------------------------------------------------

def test_old_pt_slices_and_consolidated_files_still_load(tmp_path):
    "A checkpoint whose slice is the torch.save dict earlier versions wrote, and their consolidated .pt, load alike."
    m, opt, ck = trained_checkpoint(tmp_path / "checkpoints")
    (f,) = table_slices(ck)[1]
    to_old_format(ck)
    assert table_slices(ck)[1] == [f.with_suffix(".pt")] and "self_sha256" not in verify_checkpoint(ck)
    x = torch.randint(0, m.args.vocab_size, (2, 9))
    with torch.no_grad(): assert torch.equal(load_model(ck)(x), m(x))
    m2 = tiny(seed=3); opt2 = ModelOptimizer(m2, OptimArgs(lr=1e-2, warmup=0), total_steps=10)
    load_table_shards(ck, m2, StemLayout(1, 0, 1), opt2.tables)
    for name, t in m.stem_tables.items():
        t2 = m2.stem_tables[name].weight
        assert torch.equal(t2, t.weight)
        for k, v in opt.tables.state[t.weight].items(): assert torch.equal(opt2.tables.state[t2][k], v), (name, k)
    legacy = tmp_path / "model.pt"
    torch.save({"model_args": json.loads((ck / "model_args.json").read_text()), "model": m.state_dict()}, legacy)
    with torch.no_grad(): assert torch.equal(load_model(legacy)(x), m(x))


def test_a_slice_in_both_formats_is_refused(tmp_path):
    _, _, ck = trained_checkpoint(tmp_path)
    (f,) = table_slices(ck)[1]
    torch.save(load_tensor_file(f), f.with_suffix(".pt"))
    with pytest.raises(CheckpointError, match=r"slice 0 of 1 is stored twice \(slice-000-of-001.pt and slice-000-of-001.safetensors\)"):
        table_slices(ck)


# -- crafted headers: refused naming the file, before the library opens it ----------------------------------------

def _small(tmp_path) -> tuple[Path, bytes, dict]:
    f = tmp_path / "slice.safetensors"
    save_tensor_file(f, {"P": 1, "tables": {"1": torch.arange(12.).reshape(3, 4)}, "optim": {"1": {"step": torch.tensor(3)}}})
    good = f.read_bytes()
    return f, good, _header(good)[0]


def _shift(e: dict, by: int): e["data_offsets"] = [o + by for o in e["data_offsets"]]


def _gap(h: dict):
    "Make the first tensor of the data empty: its bytes then belong to no tensor."
    first = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    h[first].update(shape=[0], data_offsets=[0, 0])


CRAFTED = {   # name -> (how the header is changed, what the refusal says)
    "offsets past EOF": (lambda h: _shift(h["tables.1"], 1000), "tensor 'tables.1' lies at bytes"),
    "overlapping": (lambda h: h["optim.1.step"].update(data_offsets=[h["tables.1"]["data_offsets"][0], h["tables.1"]["data_offsets"][0] + 8]),
                    "overlaps tensor"),
    "unknown dtype": (lambda h: h["tables.1"].update(dtype="F4"), "tensor 'tables.1' has dtype 'F4', not one of"),
    "dtype its bytes do not hold": (lambda h: h["tables.1"].update(dtype="F64"), "tensor 'tables.1' (F64 [3, 4], 96 bytes) has data_offsets"),
    "shape its bytes do not hold": (lambda h: h["tables.1"].update(shape=[4, 4]), "(F32 [4, 4], 64 bytes) has data_offsets"),
    "negative size": (lambda h: h["tables.1"].update(shape=[-3, -4]), "has shape [-3, -4], not a list of at most 8 sizes"),
    "reversed offsets": (lambda h: h["tables.1"].update(data_offsets=h["tables.1"]["data_offsets"][::-1]), "not [begin, end] with 0 <= begin <= end"),
    "a gap": (lambda h: _gap(h), "belong to no tensor"),
    "extra entry field": (lambda h: h["tables.1"].update(extra=1), "is not {dtype, shape, data_offsets}"),
    "unexpected tensor": (lambda h: h.update(x={"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}), "unexpected tensor 'x'"),
    "tree names a missing tensor": (lambda h: h["__metadata__"].update({"stem-nb.tree": h["__metadata__"]["stem-nb.tree"].replace("tables.1", "tables.9")}),
                                    "names tensor 'tables.9', which the file does not hold"),
    "no stem-nb tree": (lambda h: h["__metadata__"].pop("stem-nb.tree"), "without stem-nb's 'stem-nb.tree' metadata"),
    "metadata not strings": (lambda h: h["__metadata__"].update(n=1), "its __metadata__ is not an object of strings"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_header_is_refused_before_the_library_opens_it(tmp_path, no_library, case):
    f, good, _ = _small(tmp_path)
    edit, want = CRAFTED[case]
    rewrite_header(f, good, edit)
    with pytest.raises(CheckpointError) as err: load_tensor_file(f, mmap=True)
    assert str(err.value).startswith(f"{f} is refused: ") and want in str(err.value), err.value


@pytest.mark.parametrize("case", ["huge header length", "header past EOF", "short file", "not JSON", "duplicate key", "deep nesting",
                                  "trailing bytes"])
def test_crafted_header_bytes_are_refused(tmp_path, no_library, case):
    f, good, hdr = _small(tmp_path)
    n = int.from_bytes(good[:8], "little")
    if case == "huge header length":
        f.write_bytes((2**62).to_bytes(8, "little") + good[8:]); want = f"header length is {2**62:,} bytes, more than the limit of {SAFETENSORS_MAX_HEADER:,}"
    elif case == "header past EOF":
        f.write_bytes((len(good)).to_bytes(8, "little") + good[8:]); want = "the file holds"
    elif case == "short file": f.write_bytes(good[:8] + b"{"); want = "the file holds 1 after it"
    elif case == "not JSON":
        f.write_bytes(good[:8] + b"{" + b"x" * (n - 1) + good[8 + n:]); want = "its safetensors header is not valid JSON"
    elif case == "duplicate key":                       # a second entry for tables.1: two readers could see different tensors
        h = json.dumps(hdr)[:-1] + ', "tables.1": ' + json.dumps(hdr["tables.1"]) + "}"
        f.write_bytes(len(h).to_bytes(8, "little") + h.encode() + good[8 + n:]); want = "duplicate key 'tables.1'"
    elif case == "trailing bytes": f.write_bytes(good + bytes(8)); want = "the file holds 64: trailing bytes"
    else:
        h = '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"
        f.write_bytes(len(h).to_bytes(8, "little") + h.encode()); want = "not valid JSON (RecursionError"
    with pytest.raises(CheckpointError) as err: load_tensor_file(f)
    assert str(err.value).startswith(f"{f} is refused: ") and want in str(err.value), err.value


def test_the_refused_files_are_real_safetensors_otherwise(tmp_path):
    "The unedited file loads (the crafted cases above differ from it only in what they name), and so does a plain one with a tree."
    f, good, hdr = _small(tmp_path)
    assert torch.equal(load_tensor_file(f)["tables"]["1"], torch.arange(12.).reshape(3, 4))
    rewrite_header(f, good, lambda h: None)                             # re-serialised without padding: still fine
    assert int(load_tensor_file(f)["optim"]["1"]["step"]) == 3
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="plain.safetensors is refused: a safetensors file without stem-nb's"):
        load_tensor_file(tmp_path / "plain.safetensors")


def test_a_file_needing_more_memory_than_available_is_refused_unless_mapped(tmp_path, monkeypatch):
    f = save_tensor_file(tmp_path / "t.safetensors", {"w": torch.zeros(1 << 20)})
    monkeypatch.setattr(tensor_files, "available_memory", lambda: 1000)
    with pytest.raises(CheckpointError, match=r"t.safetensors is refused: it needs 4,194,304 bytes of memory, 1,000 are available"):
        load_tensor_file(f)
    assert load_tensor_file(f, mmap=True)["w"].shape == (1 << 20,)


# -- crafted tensors that parse: checked against the model as the .pt path does ------------------------------------

@pytest.mark.parametrize("fault", ["int32 table (same bytes)", "wrong shape", "nan", "extra layer"])
def test_a_well_formed_slice_that_does_not_fit_the_model_is_refused(tmp_path, fault):
    _, _, ck = trained_checkpoint(tmp_path)
    (f,) = table_slices(ck)[1]
    if fault == "int32 table (same bytes)":                            # F32 -> I32: the header still holds its bytes exactly
        rewrite_header(f, f.read_bytes(), lambda h: h["tables.1"].update(dtype="I32")); want = "table '1' is int32, expected float32"
    else:
        obj = load_tensor_file(f)
        t = obj["tables"]["1"]
        if fault == "wrong shape": obj["tables"]["1"] = t[:-1].clone(); want = "table '1' has shape [511, 192], expected [512, 192]"
        elif fault == "nan": t[4, 2] = float("nan"); want = "table '1' holds NaN or inf (row 4)"
        else: obj["tables"]["7"] = t.clone(); want = "unexpected table '7'"
        save_tensor_file(f, obj)
    with pytest.raises(CheckpointError) as err: load_table_shards(ck, tiny(seed=1), StemLayout(1, 0, 1))
    assert f"{f}: {want}" in str(err.value), err.value
