"""Faults on the checkpoint paths, driven as a user meets them (issue 12).

Security: a crafted checkpoint whose loading would run code (a pickle `__reduce__` -> os.system writing a marker file)
in the DCP `.metadata`, in a DCP bytes item (a model weight, an optimizer moment) or in a table slice, on every load
path: `stem-nb eval DIR`, resume (`python -m stem_nb.train CONFIG dump_dir=...`), `checkpoint.init_from`,
`load_model`, `export_consolidated`, `import_reference`. Each load must refuse with a message naming the file, exit
non-zero (command line), never create the marker, and leave every file as it was (sha256 before and after).

Reliability: a full disk during a save (monkeypatched, and a real 1 MB tmpfs where this machine lets us mount one),
DCP's `CheckpointException` during resume, per-process temp folders."""
import hashlib, json, os, pickle, shutil, subprocess, sys, warnings
from pathlib import Path

import pytest, torch
import torch.distributed.checkpoint as dcp

from stem_nb.checkpoint import (CKPT_DIR, CheckpointError, ckpt_name, dcp_load, export_consolidated, import_reference,
                                list_checkpoints, load_model, read_dcp_metadata, save_checkpoint, verify_checkpoint,
                                write_manifest, write_reference_checkpoint)
from stem_nb.model import Transformer, preset
from stem_nb.optim import OptimArgs, ModelOptimizer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "debug.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
RUN = ["val_batches=0", "checkpoint.every=0", "log_every=1", "progress=lines"]


class WritesMarker:
    "Unpickling this runs a shell command that writes `marker`: what a crafted checkpoint would carry."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (os.system, (f"echo pwned > '{self.marker}'",))


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def _train(dump, *over):
    return _cli("-m", "stem_nb.train", CONFIG, f"dump_dir={dump}", *RUN, *over)


def _eval(path):
    return _cli("-c", "import sys; from stem_nb.cli import main; sys.exit(main())", "eval", path, "--tasks", "offline")


def snapshot(d: Path) -> dict:
    "sha256 of every file under `d` (the dump's lock file excluded: it belongs to whoever runs)."
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_unchanged(d: Path, before: dict, appended=("train.log",)):
    "Every file written before is still there, byte for byte; logs may only have grown at the end."
    after = snapshot(d)
    for rel, digest in before.items():
        assert rel in after, f"{rel} was deleted"
        if rel.split("/")[-1] in appended: continue
        assert after[rel] == digest, f"{rel} changed"
    assert [p.name for p in list_checkpoints(d / CKPT_DIR)] == sorted({r.split("/")[1] for r in before if r.startswith(CKPT_DIR + "/")})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A real 2-step debug run (one checkpoint, step 2), trained once from the command line."
    dump = tmp_path_factory.mktemp("run") / "dump"
    r = _train(dump, "steps=2")
    assert r.returncode == 0, r.stderr[-4000:]
    return dump


# -- crafting ----------------------------------------------------------------------------------------------------

def _backbone_tensors(bb: Path) -> dict:
    "Every tensor of a DCP folder by flat key, read through the guarded reader."
    meta = read_dcp_metadata(bb).state_dict_metadata
    return dcp_load({k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()}, bb)


def craft(ckpt: Path, where: str, marker: Path):
    "Plant a code-running payload in checkpoint `ckpt` and rewrite its MANIFEST to match (anyone can)."
    bb = ckpt / "backbone"
    if where == "metadata":
        (bb / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    elif where in ("weight", "optimizer"):
        state = _backbone_tensors(bb)
        key = "model.tok_embeddings.weight" if where == "weight" else next(k for k in state if k.startswith("optim.state.") and k.endswith("exp_avg"))
        state[key] = WritesMarker(marker)                         # DCP stores a non-tensor as a pickled bytes item
        shutil.rmtree(bb)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore"); dcp.save(state, checkpoint_id=str(bb))
        assert not hasattr(read_dcp_metadata(bb).state_dict_metadata[key], "size")     # it is a bytes item now
    elif where == "table":
        f = next((ckpt / "stem_tables").glob("slice-*.pt"))
        torch.save({"P": 1, "slice": 0, "tables": {"1": WritesMarker(marker)}, "optim": {}}, f)
    else: raise ValueError(where)
    if (ckpt / "MANIFEST.json").exists(): write_manifest(ckpt, step=int(ckpt.name) if ckpt.name.isdigit() else 0)


def test_the_payload_is_real(tmp_path):
    "Plain unpickling of the crafted bytes does write the marker: the refusals below are not vacuous."
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.read_text().strip() == "pwned"


REFUSALS = {"metadata": "posix.system is not part of DCP metadata",
            "weight": "'model.tok_embeddings.weight' is a pickled object",
            "optimizer": "is a pickled object",
            "table": "could not be loaded with weights_only=True"}


# -- the command line: eval, resume, init_from --------------------------------------------------------------------

@pytest.mark.parametrize("where", ["metadata", "weight", "table"])
def test_eval_refuses_crafted_checkpoint(trained, tmp_path, where):
    dump, marker = tmp_path / "dump", tmp_path / "marker"
    shutil.copytree(trained, dump)
    craft(dump / CKPT_DIR / ckpt_name(2), where, marker)
    before = snapshot(dump)
    r = _eval(dump)
    assert not marker.exists()
    assert_unchanged(dump, before)
    assert r.returncode != 0
    assert REFUSALS[where] in r.stderr, r.stderr[-3000:]
    if where == "metadata": assert "backbone/.metadata is refused" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-3000:]     # one clear line (stem_nb.eval.cli must catch CheckpointError)


@pytest.mark.parametrize("where", ["metadata", "optimizer", "table"])
def test_resume_refuses_crafted_checkpoint(trained, tmp_path, where):
    dump, marker = tmp_path / "dump", tmp_path / "marker"
    shutil.copytree(trained, dump)
    craft(dump / CKPT_DIR / ckpt_name(2), where, marker)
    before, log = snapshot(dump), (dump / "train.log").read_text()
    r = _train(dump, "steps=4")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "could be loaded" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert REFUSALS[where] in (dump / "train.log").read_text()            # each skipped checkpoint is named, with why
    assert not marker.exists()
    assert_unchanged(dump, before)
    assert (dump / "train.log").read_text().startswith(log)


def test_init_from_refuses_crafted_checkpoint(trained, tmp_path):
    src, marker = tmp_path / "src", tmp_path / "marker"
    shutil.copytree(trained, src)
    craft(src / CKPT_DIR / ckpt_name(2), "metadata", marker)
    before = snapshot(src)
    r = _train(tmp_path / "new", "steps=2", f"checkpoint.init_from={src}")
    assert r.returncode != 0 and REFUSALS["metadata"] in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not marker.exists()
    assert_unchanged(src, before)


# -- the Python API: load_model, export_consolidated, import_reference --------------------------------------------

def _small_checkpoint(root: Path) -> Path:
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", n_layers=3))
    opt = ModelOptimizer(m, OptimArgs(lr=1e-2, warmup=0), total_steps=4)
    x = torch.randint(0, m.args.vocab_size, (2, 9)); m(x, x).backward(); opt.step(); opt.zero_grad()
    return save_checkpoint(root, 1, m, opt)


@pytest.mark.parametrize("where", ["metadata", "weight", "table"])
@pytest.mark.parametrize("path", ["load_model", "export_consolidated"])
def test_api_refuses_crafted_checkpoint(tmp_path, where, path):
    ck, marker = _small_checkpoint(tmp_path / CKPT_DIR), tmp_path / "marker"
    craft(ck, where, marker)
    verify_checkpoint(ck)                                        # the manifest matches: it checks integrity, not authenticity
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path) if path == "load_model" else export_consolidated(ck, tmp_path / "out.pt")
    assert REFUSALS[where] in str(err.value) and str(ck) in str(err.value), err.value
    assert not marker.exists() and not (tmp_path / "out.pt").exists()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["metadata", "weight", "shard"])
def test_import_reference_refuses_crafted_checkpoint(tmp_path, where):
    "The reference checkpoint has no manifest at all: only the guarded readers stand between its files and the loader."
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", n_layers=3))
    ref, marker = write_reference_checkpoint(m, tmp_path / "ref", P=2), tmp_path / "marker"
    if where == "shard": torch.save({"stem_embeddings.1.weight": WritesMarker(marker)}, ref / "stem_shards" / "stem_model_mp1.pt")
    elif where == "weight":
        state = _backbone_tensors(ref); state["model.lm_transformer.norm.weight"] = WritesMarker(marker)
        for f in ref.glob("*.distcp"): f.unlink()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore"); dcp.save(state, checkpoint_id=str(ref))
    else: (ref / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    before = snapshot(tmp_path)
    want = {"metadata": "is not part of DCP metadata", "weight": "is a pickled object", "shard": "stem_model_mp1.pt could not be loaded"}
    with pytest.raises(CheckpointError, match=want[where]): import_reference(ref)
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_metadata_escaping_the_folder_is_refused(tmp_path):
    "A .metadata pointing DCP at a file outside the checkpoint (../../secret) is refused before anything is read."
    ck = _small_checkpoint(tmp_path / CKPT_DIR)
    meta = read_dcp_metadata(ck / "backbone")
    for info in meta.storage_data.values(): info.relative_path = "../../secret.distcp"
    (ck / "backbone" / ".metadata").write_bytes(pickle.dumps(meta)); write_manifest(ck, step=1)
    with pytest.raises(CheckpointError, match="is not a file name inside"): load_model(ck)


# -- disk full ---------------------------------------------------------------------------------------------------

def test_disk_full_during_save_is_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / CKPT_DIR
    _small_checkpoint(root)
    before = snapshot(tmp_path)
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", n_layers=3))
    opt = ModelOptimizer(m, OptimArgs(lr=1e-2), total_steps=4)
    def no_space(*a, **k): raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(CheckpointError, match=r"No space left on device.*needs about [\d,]+ bytes \(this rank's part\), [\d,]+ bytes are free"):
        save_checkpoint(root, 2, m, opt)
    assert [p.name for p in root.iterdir()] == [ckpt_name(1)]            # no temp folder left, no step 2
    assert snapshot(tmp_path) == before


@pytest.fixture
def small_tmpfs(tmp_path):
    "A 1 MB tmpfs, when this machine lets us mount one (root, CAP_SYS_ADMIN); else the test is skipped with the reason."
    mnt = tmp_path / "tmpfs"; mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0: pytest.skip(f"cannot mount a 1 MB tmpfs here ({(r.stderr or r.stdout).strip() or 'mount failed'}): "
                                      "the monkeypatched disk-full test covers the code path")
    try: yield mnt
    finally: subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_on_a_real_tmpfs_from_the_command_line(small_tmpfs):
    dump = small_tmpfs / "run"
    r = _train(dump, "steps=2")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "needs about" in r.stderr and "bytes are free" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    ck = dump / CKPT_DIR
    assert not list(ck.glob(".tmp-*")) and list_checkpoints(ck) == []     # the partial save was removed
    assert (dump / "metrics.jsonl").is_file()                              # what was written before is still there
