"""Faults on the checkpoint paths, driven as a user meets them.

Security: a crafted checkpoint whose loading would run code (a pickle `__reduce__` -> os.system writing a marker file)
in the DCP `.metadata`, in a DCP bytes item (a model weight, an optimizer moment) or in a table slice, on every load
path: `stem-nb eval DIR`, resume (`python -m stem_nb.train CONFIG dump_dir=...`), `checkpoint.init_from`,
`load_model`, `export_consolidated`, `import_reference`. Each load must refuse with a message naming the file, exit
non-zero (command line), never create the marker, and leave every file as it was (sha256 before and after).

Reliability: a full disk during a save (monkeypatched, and a real 1 MB tmpfs where this machine lets us mount one),
DCP's `CheckpointException` during resume, per-process temp folders.

A `.metadata` that changes a class of the loading process through pickle's BUILD (each allowed
global in turn); memory bombs (deflated zip entries in a `.pt`, a reference shard or a DCP item; sizes declared in
a reference `.metadata`; model args of an enormous model), each refused before allocating, measured in a subprocess;
table slices and consolidated files that do not match the model (NaN/inf rows, int64, an extra layer, wrong shape,
no `tables`, a list); table optimizer state the optimizer refuses; a corrupt newest checkpoint named when an older
one is scored; a checkpoint pinned against pruning while a reader reads it; a malformed `checkpoint.init_from`."""
import collections, hashlib, importlib, io, json, os, pickle, pickletools, shutil, struct, subprocess, sys, textwrap, warnings, zipfile
from pathlib import Path

import pytest, torch
import torch.distributed.checkpoint as dcp

from stem_nb.checkpoint import (CKPT_DIR, MANIFEST, REPLACED_DIR, ckpt_name, list_checkpoints, pin_checkpoint, prune_checkpoints,
                                save_checkpoint, verify_checkpoint, write_manifest)
from stem_nb.restore import (export_consolidated, import_reference, load_latest, load_model, load_table_shards,
                             write_reference_checkpoint)
from stem_nb.tensor_files import (CheckpointError, _METADATA_GLOBALS, dcp_load, load_tensor_file, read_dcp_metadata,
                                  save_tensor_file)
from stem_nb.distributed import StemLayout
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


def _eval(path, *args):
    return _cli("-c", "import sys; from stem_nb.cli import main; sys.exit(main())", "eval", path, "--tasks", "offline", *args)


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


def setattr_on(module: str, name: str, attr: str, good: bytes, slot: bool = True) -> bytes:
    """Raw pickle opcodes: push the global `module.name`, BUILD it with the state {attr: 'pwned'} (as slot state, which
    pickle applies with setattr; else as `__dict__` state), POP it, then the valid pickle `good` (its PROTO dropped)."""
    s = lambda x: b"X" + struct.pack("<I", len(x)) + x.encode()             # BINUNICODE
    state = b"}" + s(attr) + s("pwned") + b"s"                               # EMPTY_DICT key value SETITEM
    if slot: state = b"N" + state + b"\x86"                                  # (None, {...}): TUPLE2
    evil = b"\x80\x02c" + f"{module}\n{name}\n".encode() + state + b"b0" + good[2:]     # GLOBAL ... BUILD POP ...
    pickletools.dis(evil, out=io.StringIO())                                 # a well-formed pickle
    return evil


def craft(ckpt: Path, where: str, marker: Path):
    "Plant a code-running payload in checkpoint `ckpt` and rewrite its MANIFEST to match (anyone can)."
    bb = ckpt / "backbone"
    if where == "metadata":
        (bb / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    elif where == "build":                                       # PosixPath.exists = "pwned", then the real metadata
        (bb / ".metadata").write_bytes(setattr_on("pathlib", "PosixPath", "exists", (bb / ".metadata").read_bytes()))
    elif where in ("weight", "optimizer"):
        state = _backbone_tensors(bb)
        key = "model.tok_embeddings.weight" if where == "weight" else next(k for k in state if k.startswith("optim.state.") and k.endswith("exp_avg"))
        state[key] = WritesMarker(marker)                         # DCP stores a non-tensor as a pickled bytes item
        shutil.rmtree(bb)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore"); dcp.save(state, checkpoint_id=str(bb))
        assert not hasattr(read_dcp_metadata(bb).state_dict_metadata[key], "size")     # it is a bytes item now
    elif where == "table":                                       # a slice in the .pt format earlier versions wrote
        f = next((ckpt / "stem_tables").glob("slice-*"))
        f.unlink(); torch.save({"P": 1, "slice": 0, "tables": {"1": WritesMarker(marker)}, "optim": {}}, f.with_suffix(".pt"))
    else: raise ValueError(where)
    if (ckpt / "MANIFEST.json").exists(): write_manifest(ckpt, step=int(ckpt.name) if ckpt.name.isdigit() else 0)


def test_the_payload_is_real(tmp_path):
    "Plain unpickling of the crafted bytes does write the marker: the refusals below are not vacuous."
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesMarker(marker)))
    assert marker.read_text().strip() == "pwned"


REFUSALS = {"metadata": "posix.system is not part of DCP metadata",
            "build": "BUILD applied to the class pathlib.PosixPath, which this file did not create",
            "weight": "'model.tok_embeddings.weight' is a pickled object",
            "optimizer": "is a pickled object",
            "table": "could not be loaded with weights_only=True"}


# -- the command line: eval, resume, init_from --------------------------------------------------------------------

@pytest.mark.parametrize("where", ["metadata", "build", "weight", "table"])
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
    if where in ("metadata", "build"): assert "backbone/.metadata is refused" in r.stderr
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


@pytest.mark.parametrize("where", ["metadata", "build", "weight", "table"])
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


# -- round 3: BUILD on an allowed global ---------------------------------------------------------------------------

_DTYPES = sorted({n for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)})
ALLOWED = sorted(_METADATA_GLOBALS) + [("torch", n) for n in _DTYPES]      # every global the metadata reader resolves
_MISSING = object()


def _good_metadata(d: Path) -> bytes:
    "The `.metadata` DCP writes for a small state dict (tensors, chunks, storage entries: every class it pickles)."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); dcp.save({"model": {"w": torch.arange(6.).reshape(2, 3)}, "step": torch.tensor(3)}, checkpoint_id=str(d))
    return (d / ".metadata").read_bytes()


def test_the_build_trick_is_real(tmp_path):
    "Plain unpickling of the crafted bytes does change the class (undone at once): the refusals below are not vacuous."
    from torch.distributed.checkpoint.metadata import Metadata
    good = _good_metadata(tmp_path)
    try:
        assert isinstance(pickle.loads(setattr_on("pathlib", "PosixPath", "exists", good)), Metadata)
        assert Path(tmp_path / "nope").exists == "pwned"                   # every path's exists() is gone
    finally: del __import__("pathlib").PosixPath.exists
    try:
        pickle.loads(setattr_on("torch.distributed.checkpoint.metadata", "Metadata", "version", good))
        assert Metadata.version == "pwned"
    finally: Metadata.version = None
    assert not Path(tmp_path / "nope").exists() and Metadata.version is None


@pytest.mark.parametrize("module,name", ALLOWED, ids=[f"{m}.{n}" for m, n in ALLOWED])
def test_build_on_each_allowed_global_is_refused_and_changes_nothing(tmp_path, module, name):
    """For each global the reader resolves: BUILD with attribute state on it (as pickle's slot state, set with setattr, and
    as `__dict__` state), followed by a valid Metadata. The file is refused and the global is as it was."""
    from torch.distributed.checkpoint.metadata import Metadata
    obj = getattr(importlib.import_module(module), name)
    attr = {"PosixPath": "exists", "Metadata": "version"}.get(name, "pwned")
    had, attrs = getattr(obj, attr, _MISSING), dict(vars(obj)) if hasattr(obj, "__dict__") else None
    good = _good_metadata(tmp_path)
    for slot in (True, False):
        (tmp_path / ".metadata").write_bytes(setattr_on(module, name, attr, good, slot))
        try:
            with pytest.raises(CheckpointError, match=r"\.metadata is refused: UnpicklingError: BUILD applied to .*which this file did not create"):
                read_dcp_metadata(tmp_path)
        finally:
            changed = getattr(obj, attr, _MISSING) is not had
            if changed and had is _MISSING: delattr(obj, attr)         # keep this process usable if the guard failed
            elif changed: setattr(obj, attr, had)
        assert not changed, f"{module}.{name}.{attr} was changed"
        assert (dict(vars(obj)) if attrs is not None else None) == attrs
    assert Metadata.version is None
    (tmp_path / ".metadata").write_bytes(good)
    assert read_dcp_metadata(tmp_path).state_dict_metadata["model.w"].size == (2, 3)    # the real file still reads


def test_item_opcodes_on_a_global_are_refused(tmp_path):
    "SETITEMS on a class (here OrderedDict, which takes no items) is refused by name, not left to the class to reject."
    good = _good_metadata(tmp_path)
    evil = b"\x80\x02ccollections\nOrderedDict\n(X\x01\x00\x00\x00kX\x01\x00\x00\x00vu0" + good[2:]
    pickletools.dis(evil, out=io.StringIO())
    (tmp_path / ".metadata").write_bytes(evil)
    with pytest.raises(CheckpointError, match="SETITEMS applied to the class collections.OrderedDict"): read_dcp_metadata(tmp_path)


# -- round 3: bounded loads ----------------------------------------------------------------------------------------

_STORAGE = object()


class _DeclaredTensor:
    "Pickles as torch.save's record of a float32 tensor of `n` elements in storage '0', whatever the archive holds."
    def __init__(self, n): self.n = n
    def __reduce__(self): return (torch._utils._rebuild_tensor_v2, (_STORAGE, 0, (self.n,), (1,), False, collections.OrderedDict()))


def deflate_bomb(nbytes: int, wrap=lambda t: t) -> bytes:
    """A torch archive of `wrap(a float32 tensor of nbytes)` whose data entry is deflated: `nbytes` of zeros in about
    nbytes/1000 bytes, which torch.load expands in full. Written without ever holding `nbytes` in memory."""
    n = nbytes // 4
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj): return ("storage", torch.FloatStorage, "0", "cpu", n) if obj is _STORAGE else None
    pkl = io.BytesIO(); Pickler(pkl, protocol=2).dump(wrap(_DeclaredTensor(n)))
    small, out = io.BytesIO(), io.BytesIO()
    torch.save(torch.zeros(1), small)
    with zipfile.ZipFile(small) as src, zipfile.ZipFile(out, "w") as z:
        for i in src.infolist():
            name = "archive/" + i.filename.split("/", 1)[1]
            if name.endswith("/data.pkl"): z.writestr(name, pkl.getvalue())
            elif name.endswith("/data/0"):
                info = zipfile.ZipInfo(name); info.compress_type = zipfile.ZIP_DEFLATED
                with z.open(info, "w", force_zip64=True) as w:
                    for k in range(0, nbytes, 1 << 20): w.write(bytes(min(1 << 20, nbytes - k)))
            else: z.writestr(name, src.read(i))
    return out.getvalue()


BOMB = 256 << 20      # declared bytes: enough to see in a subprocess's peak RSS, cheap to write (a deflated 256 KB)


def _peak(code: str, as_headroom_gb: float = 0) -> tuple[subprocess.CompletedProcess, float]:
    """Run `code` in a fresh Python after importing torch and stem_nb's tensor_files, checkpoint and restore; (the result, MB
    its peak resident memory rose above its resident memory at the start of `code`: the peak is reset there through
    /proc/self/clear_refs).
    `as_headroom_gb`: first cap its address space (RLIMIT_AS) at what it has mapped plus this much."""
    prog = textwrap.dedent(f"""
        import re, resource, sys
        import torch
        from stem_nb.tensor_files import *
        from stem_nb.checkpoint import *
        from stem_nb.restore import *
        status = lambda k: int(re.search(k + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
        if {as_headroom_gb}:
            mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (mapped + int({as_headroom_gb} * 2**30), resource.RLIM_INFINITY))
        with open("/proc/self/clear_refs", "w") as f: f.write("5")          # VmHWM := VmRSS
        before = status("VmRSS")
        try:
            exec(sys.argv[1])
        finally:
            print("grown_kb", status("VmHWM") - before, flush=True)
        """)
    r = _cli("-c", prog, code)
    return r, int(r.stdout.split("grown_kb")[-1]) / 1024


def test_the_bomb_is_real(tmp_path):
    "torch.load of the crafted archive does allocate what it declares: the refusals below are not vacuous."
    f = tmp_path / "bomb.pt"; f.write_bytes(deflate_bomb(BOMB))
    assert f.stat().st_size < BOMB / 500
    r, grown = _peak(f"assert torch.load({str(f)!r}, weights_only=True).numel() == {BOMB // 4}")
    assert r.returncode == 0 and grown > 0.9 * BOMB / 2**20, (grown, r.stderr[-2000:])


def _args_dict(trained) -> dict:
    return json.loads((trained / CKPT_DIR / ckpt_name(2) / "model_args.json").read_text())


def test_load_model_refuses_a_deflated_pt_before_allocating(trained, tmp_path):
    f = tmp_path / "model.pt"
    f.write_bytes(deflate_bomb(BOMB, lambda t: {"model_args": _args_dict(trained), "model": {"tok_embeddings.weight": t}}))
    before = snapshot(tmp_path)
    r, grown = _peak(f"load_model({str(f)!r})")
    assert r.returncode == 1 and "CheckpointError" in r.stderr, r.stderr[-2000:]
    assert f"{f}: entry 'archive/data/0' is compressed; torch.save stores every entry" in r.stderr
    assert grown < 64, f"peak RSS grew by {grown:.0f} MB"
    assert snapshot(tmp_path) == before


def test_overlapping_entries_are_refused(tmp_path):
    "A stored archive whose central directory lists its data twice (two storages on the same bytes) declares more than it holds."
    f = tmp_path / "t.pt"
    torch.save({"a": torch.zeros(1000)}, f)
    with zipfile.ZipFile(f, "a") as z:                    # a second directory entry for the same local data
        i = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
        dup = zipfile.ZipInfo(i.filename + "0", i.date_time)
        for k in ("compress_type", "compress_size", "file_size", "CRC", "header_offset", "extra", "flag_bits"): setattr(dup, k, getattr(i, k))
        z.filelist.append(dup); z.NameToInfo[dup.filename] = dup; z._didModify = True
    with pytest.raises(CheckpointError, match=r"its entries declare [\d,]+ bytes, more than the [\d,]+ bytes it holds \(overlapping"):
        load_model(f)


def test_a_deflated_dcp_item_is_refused_before_allocating(tmp_path):
    """The backbone's DCP file rewritten with one item a deflated archive declaring 256 MB (the metadata's offsets updated,
    the manifest rewritten): refused from the item's own bytes before torch.load sees them."""
    ck = _small_checkpoint(tmp_path / CKPT_DIR)
    bb = ck / "backbone"
    meta = read_dcp_metadata(bb)
    old = next(bb.glob("*.distcp")).read_bytes()
    out, bomb = io.BytesIO(), deflate_bomb(BOMB)
    for idx, info in sorted(meta.storage_data.items(), key=lambda kv: kv[1].offset):
        item = bomb if idx.fqn == "model.tok_embeddings.weight" else old[info.offset:info.offset + info.length]
        info.offset, info.length = out.tell(), len(item); out.write(item)
    next(bb.glob("*.distcp")).write_bytes(out.getvalue())
    (bb / ".metadata").write_bytes(pickle.dumps(meta)); write_manifest(ck, step=1)
    before = snapshot(tmp_path)
    r, grown = _peak(f"load_model({str(ck)!r})")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "__0_0.distcp (entry 'model.tok_embeddings.weight'): entry 'archive/data/0' is compressed" in r.stderr, r.stderr[-2000:]
    assert grown < 64, f"peak RSS grew by {grown:.0f} MB"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["shard", "metadata", "params"])
def test_import_reference_checks_sizes_before_allocating(tmp_path, where):
    """A reference checkpoint (no manifest) that asks for memory: a deflated table shard; a `.metadata` declaring the
    token embedding 2^17 x 2^17 (64 GiB of float32; the model is 512 x 64); a params.json of dim 2^20. Each is refused
    naming the file, in a process whose address space is capped 2 GiB above what it has mapped."""
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", n_layers=3))
    ref = write_reference_checkpoint(m, tmp_path / "ref", P=1)
    if where == "shard":
        (ref / "stem_shards" / "stem_model_mp0.pt").write_bytes(deflate_bomb(BOMB, lambda t: {"stem_embeddings.1.weight": t}))
        want = "stem_model_mp0.pt: entry 'archive/data/0' is compressed"
    elif where == "metadata":
        meta = read_dcp_metadata(ref)
        meta.state_dict_metadata["model.lm_transformer.tok_embeddings.weight"].size = torch.Size([2**17, 2**17])
        (ref / ".metadata").write_bytes(pickle.dumps(meta))
        want = "ref/.metadata: model.lm_transformer.tok_embeddings.weight declares shape [131072, 131072], the model expects [512, 64]"
    else:
        p = json.loads((ref / "params.json").read_text()); p["model"]["dim"] = 2**20
        (ref / "params.json").write_text(json.dumps(p))
        want = "params.json: its model args describe"
    before = snapshot(tmp_path)
    r, grown = _peak(f"import_reference({str(ref)!r})", as_headroom_gb=2)
    assert r.returncode == 1 and want in r.stderr, r.stderr[-2000:]
    assert "CheckpointError" in r.stderr.splitlines()[-1] and grown < 64, (grown, r.stderr[-2000:])
    assert snapshot(tmp_path) == before


# -- round 3: every model input checked, one clear message from the command line -----------------------------------

def _dump_copy(trained, tmp_path) -> tuple[Path, Path]:
    dump = tmp_path / "dump"; shutil.copytree(trained, dump)
    return dump, dump / CKPT_DIR / ckpt_name(2)


def _refused_by_eval(target: Path, dump: Path, want: str):
    "`stem-nb eval target` exits 2 with one line naming the problem (`want`), and nothing in `dump` changed."
    before = snapshot(dump)
    r = _eval(target)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert want in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert_unchanged(dump, before)


SLICE = "stem_tables/slice-000-of-001.safetensors"
TABLE_FAULTS = {"nan": f"{SLICE}: table '1' holds NaN or inf (row 3)",
                "inf": f"{SLICE}: table '1' holds NaN or inf (row 3)",
                "int64": f"{SLICE}: table '1' is int64, expected float32",
                "extra_layer": f"{SLICE}: unexpected table '7': the model has no such table",
                "wrong_shape": f"{SLICE}: table '1' has shape [4096, 191], expected [4096, 192]",
                "no_tables": f"{SLICE}: no 'tables' key: not a stem-nb table slice",
                "list": "stem_tables/slice-000-of-001.pt: holds a list, not a table slice"}     # only a .pt of earlier versions can


@pytest.mark.parametrize("fault", list(TABLE_FAULTS))
def test_eval_refuses_a_bad_table_slice(trained, tmp_path, fault):
    "Unchecked, NaN rows score acc 0.0 with exit 0, an int64 table is cast silently, an extra layer's is ignored: each is refused."
    dump, ck = _dump_copy(trained, tmp_path)
    obj = load_tensor_file(ck / SLICE)
    t = obj["tables"]["1"]
    if fault == "nan": t[3, 5] = float("nan")
    elif fault == "inf": t[3, 0] = float("-inf")
    elif fault == "int64": obj["tables"]["1"] = t.long()
    elif fault == "extra_layer": obj["tables"]["7"] = t.clone()
    elif fault == "wrong_shape": obj["tables"]["1"] = t[:, :-1].clone()
    elif fault == "no_tables": del obj["tables"]
    if fault == "list":
        (ck / SLICE).unlink(); torch.save(list(obj["tables"].values()), (ck / SLICE).with_suffix(".pt"))
    else: save_tensor_file(ck / SLICE, obj)
    write_manifest(ck, step=2)
    _refused_by_eval(dump, dump, TABLE_FAULTS[fault])


@pytest.mark.parametrize("fault", ["model_args", "nan_weight", "missing_weight"])
def test_eval_refuses_a_consolidated_pt_that_does_not_match_its_model_args(trained, tmp_path, fault):
    dump, ck = _dump_copy(trained, tmp_path)
    f = export_consolidated(ck, dump / "model.safetensors")
    obj = load_tensor_file(f)
    if fault == "model_args": obj["model_args"]["dim"] = 128
    elif fault == "nan_weight": obj["model"]["norm.weight"][7] = float("nan")
    else: del obj["model"]["layers.2.ffn_norm.weight"]
    save_tensor_file(f, obj)
    want = {"model_args": "model.safetensors: weight 'tok_embeddings.weight' has shape [4096, 64], expected [4096, 128]",
            "nan_weight": "model.safetensors: weight 'norm.weight' holds NaN or inf (row 7)",
            "missing_weight": "model.safetensors: no weight 'layers.2.ffn_norm.weight' (1 missing)"}[fault]
    _refused_by_eval(f, dump, want)


def test_eval_refuses_model_args_of_an_enormous_model_before_building_it(trained, tmp_path):
    "model_args.json with dim=2^20 (manifest rewritten): refused from the args alone, in seconds, naming the file."
    dump, ck = _dump_copy(trained, tmp_path)
    a = _args_dict(trained); a["dim"] = 2**20
    (ck / "model_args.json").write_text(json.dumps(a)); write_manifest(ck, step=2)
    _refused_by_eval(dump, dump, f"{ck / 'model_args.json'}: its model args describe")


# -- round 3: table optimizer state the optimizer refuses -----------------------------------------------------------

def test_refused_table_state_is_a_checkpoint_error_naming_the_slice(tmp_path):
    "A one-element `row_step` (which the row kernel would index past): TableAdamW.validate_state refuses it, naming the slice."
    ck = _small_checkpoint(tmp_path / CKPT_DIR)
    f = ck / SLICE
    obj = load_tensor_file(f); obj["optim"]["1"]["row_step"] = obj["optim"]["1"]["row_step"][:1].clone(); save_tensor_file(f, obj)
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", n_layers=3, seed=9))
    w0, opt = {k: t.weight.detach().clone() for k, t in m.stem_tables.items()}, ModelOptimizer(m, OptimArgs(), total_steps=4).tables
    with pytest.raises(CheckpointError, match=r"slice-000-of-001.safetensors: the optimizer state of table '1' is refused: "
                                              r"TableAdamW: .*'row_step': expected shape \(512,\), found \(1,\)"):
        load_table_shards(ck, m, StemLayout(1, 0, 1), opt)
    assert not opt.state and all(torch.equal(t.weight, w0[k]) for k, t in m.stem_tables.items())     # nothing was assigned


def test_resume_falls_back_past_table_state_the_optimizer_refuses(trained, tmp_path):
    "A one-element `row_step` in the newest checkpoint: resume names it and falls back to the previous checkpoint."
    dump = tmp_path / "dump"; shutil.copytree(trained, dump)
    assert _train(dump, "steps=4").returncode == 0
    ck = dump / CKPT_DIR / ckpt_name(4)
    obj = load_tensor_file(ck / SLICE)
    obj["optim"]["1"]["row_step"] = obj["optim"]["1"]["row_step"][:1].clone()
    save_tensor_file(ck / SLICE, obj); write_manifest(ck, step=4)
    r = _train(dump, "steps=5")
    assert r.returncode == 0, r.stderr[-3000:]
    log = (dump / "train.log").read_text()
    assert f"skipping checkpoint {ck}" in log and "the optimizer state of table '1' is refused" in log and "'row_step'" in log, log[-3000:]
    assert f"resumed from {dump / CKPT_DIR / ckpt_name(2)}" in log


# -- round 3: a corrupt newest checkpoint is named -------------------------------------------------------------------

def test_eval_names_the_corrupt_newer_checkpoint_it_skips(trained, tmp_path):
    dump, ck = _dump_copy(trained, tmp_path)
    newer = dump / CKPT_DIR / ckpt_name(3); shutil.copytree(ck, newer)
    data = bytearray((newer / SLICE).read_bytes()); data[len(data) // 2] ^= 0xFF; (newer / SLICE).write_bytes(bytes(data))
    before = snapshot(dump)
    r = _eval(dump, "--limit", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"WARNING: skipping corrupt checkpoint {newer}: {newer / SLICE} is corrupted" in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("skipping corrupt checkpoint") == 1 and f"using the older {ck}" in r.stderr
    assert f"scoring {ck.resolve()} (step 2)" in r.stdout
    assert_unchanged(dump, before)


# -- round 3: a reader's checkpoint is pinned against pruning -------------------------------------------------------

READER = textwrap.dedent("""
    import sys
    import stem_nb.restore as c
    real = c.load_backbone
    def paused(d, *a, **k):                      # the reader stops mid-read until told to go on
        print("reading", d, flush=True); sys.stdin.readline()
        return real(d, *a, **k)
    c.load_backbone = paused
    m = c.load_model(sys.argv[1])
    print("loaded", sum(float(p.detach().sum()) for p in m.parameters()), flush=True)
    """)


def test_a_checkpoint_being_read_survives_pruning(tmp_path):
    """A reader (`load_model` of the dump, the path `stem-nb eval DIR` takes) stops mid-read; meanwhile the trainer saves
    a newer checkpoint with keep=1. The one being read is kept (pinned) and the reader finishes; the next prune removes it."""
    root = tmp_path / CKPT_DIR
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", n_layers=3))
    opt = ModelOptimizer(m, OptimArgs(lr=1e-2, warmup=0), total_steps=4)
    old = save_checkpoint(root, 1, m, opt)
    before = snapshot(old)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        assert reader.stdout.readline().strip() == f"reading {old}", reader.stderr.read()[-2000:]
        assert (old / f".pin-{reader.pid}").is_file()
        save_checkpoint(root, 2, m, opt, keep=1)
        assert [p.name for p in list_checkpoints(root)] == [ckpt_name(1), ckpt_name(2)]     # the pinned one stays
        out, err = reader.communicate("go\n", timeout=300)
    finally:
        if reader.poll() is None: reader.kill(); reader.wait()
    assert reader.returncode == 0 and "loaded" in out, err[-3000:]
    assert float(out.split()[-1]) == pytest.approx(sum(float(p.detach().sum()) for p in m.parameters()))
    assert snapshot(old) == before                                                       # the pin is gone, nothing else changed
    prune_checkpoints(root, 1)
    assert [p.name for p in list_checkpoints(root)] == [ckpt_name(2)]


def test_a_stale_pin_does_not_block_pruning(tmp_path):
    "Marks left by dead processes (pid beyond pid_max): a pin does not keep a checkpoint, a pruning mark does not stop a reader."
    root = tmp_path / CKPT_DIR
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", n_layers=3))
    one = save_checkpoint(root, 1, m)
    (one / ".pin-999999999").touch()
    two = save_checkpoint(root, 2, m)
    (two / ".pruning-999999999").touch()
    with pin_checkpoint(two): assert (two / f".pin-{os.getpid()}").is_file()
    assert not (two / f".pin-{os.getpid()}").exists()
    prune_checkpoints(root, 1)
    assert [p.name for p in list_checkpoints(root)] == [ckpt_name(2)]
    assert load_model(tmp_path).args == m.args


# -- round 3: checkpoint.init_from pointing at a malformed file ----------------------------------------------------

@pytest.mark.parametrize("kind", ["garbage", "deflated", "mismatch"])
def test_init_from_a_malformed_file_is_one_clear_error(trained, tmp_path, kind):
    f = tmp_path / "init.pt"
    if kind == "garbage": f.write_bytes(b"not a checkpoint\n" * 64)
    elif kind == "deflated": f.write_bytes(deflate_bomb(BOMB, lambda t: {"model_args": _args_dict(trained), "model": {"tok_embeddings.weight": t}}))
    else:
        export_consolidated(trained / CKPT_DIR / ckpt_name(2), f)
        obj = load_tensor_file(f); obj["model_args"]["dim"] = 128; save_tensor_file(f, obj)
    want = {"garbage": f"{f} is neither a safetensors file nor a torch zip archive", "deflated": f"{f}: entry 'archive/data/0' is compressed",
            "mismatch": f"{f}: weight 'tok_embeddings.weight' has shape [4096, 64], expected [4096, 128]"}[kind]
    before = snapshot(tmp_path)
    r = _train(tmp_path / "new", "steps=2", f"checkpoint.init_from={f}")
    assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"checkpoint.init_from={f}" in r.stderr
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("new/")} == before


# -- follow-ups: malformed manifests, the manifest's own fields, a step saved again, files of earlier versions, crafted safetensors

def _newer_copy(dump: Path, ck: Path) -> Path:
    "A second checkpoint (step 3) in `dump`: a copy of `ck`, its manifest signed for step 3."
    newer = dump / CKPT_DIR / ckpt_name(3)
    shutil.copytree(ck, newer); write_manifest(newer, step=3, world_size=1)
    return newer


MANIFEST_FAULTS = {   # how the newest MANIFEST.json is spoiled -> what eval says about it (more cases: tests/test_checkpoint.py)
    "a JSON list": (lambda m: [m], "is not a valid stem-nb manifest (it holds a JSON list, not an object)"),
    "entry without sha256": (lambda m: {**{k: v for k, v in m.items() if k != "self_sha256"}, "format": "stem-nb/1",
                                        "files": {k: {"size": v["size"]} for k, v in m["files"].items()}},
                             "is not a valid stem-nb manifest (entry 'backbone/.metadata' has no 'sha256')"),
    "step changed": (lambda m: {**m, "step": 4}, "is corrupted: its self_sha256 does not match its other fields"),
}


@pytest.mark.parametrize("fault", list(MANIFEST_FAULTS))
def test_eval_falls_back_past_a_malformed_newest_manifest(trained, tmp_path, fault):
    dump, ck = _dump_copy(trained, tmp_path)
    newer = _newer_copy(dump, ck)
    spoil, want = MANIFEST_FAULTS[fault]
    (newer / MANIFEST).write_text(json.dumps(spoil(json.loads((newer / MANIFEST).read_text()))))
    before = snapshot(dump)
    r = _eval(dump, "--limit", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"WARNING: skipping corrupt checkpoint {newer}: {newer / MANIFEST} {want}" in r.stderr, r.stderr[-3000:]
    assert f"using the older {ck}" in r.stderr and "Traceback" not in r.stderr
    assert f"scoring {ck.resolve()} (step 2)" in r.stdout
    assert_unchanged(dump, before)


def test_eval_of_a_single_checkpoint_with_a_malformed_manifest_is_one_message(trained, tmp_path):
    dump, ck = _dump_copy(trained, tmp_path)
    (ck / MANIFEST).write_text(json.dumps({"format": "stem-nb/1", "files": {"model_args.json": {"size": 3}}}))
    _refused_by_eval(dump, dump, f"{ck / MANIFEST} is not a valid stem-nb manifest (entry 'model_args.json' has no 'sha256')")


def test_resume_that_saves_a_skipped_step_again_keeps_the_old_files_aside(trained, tmp_path):
    """A run whose newest checkpoint (4) is corrupt falls back to 2, trains through 4 again and saves it: the old 4 is
    moved to checkpoints/.replaced/0000000004-1, byte for byte, instead of being deleted."""
    dump = tmp_path / "dump"; shutil.copytree(trained, dump)
    assert _train(dump, "steps=4").returncode == 0
    four = dump / CKPT_DIR / ckpt_name(4)
    data = bytearray((four / SLICE).read_bytes()); data[len(data) // 2] ^= 0xFF; (four / SLICE).write_bytes(bytes(data))
    old = snapshot(four)
    r = _train(dump, "steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping checkpoint {four}: {four / SLICE} is corrupted" in r.stderr, r.stderr[-3000:]
    aside = dump / CKPT_DIR / REPLACED_DIR / f"{ckpt_name(4)}-1"
    assert snapshot(aside) == old                                          # every file of the corrupt 4, unchanged
    assert verify_checkpoint(four)["step"] == 4 and snapshot(four) != old  # the new 4, sound
    assert [p.name for p in list_checkpoints(dump / CKPT_DIR)] == [ckpt_name(2), ckpt_name(4)]


def test_a_checkpoint_of_an_earlier_version_loads_and_resumes_bitwise(trained, tmp_path):
    """The same checkpoint in the format earlier versions wrote (.pt slices through torch.save, a stem-nb/1 manifest)
    resumes to the same losses, bit for bit, as the current format; what it writes next is safetensors."""
    from test_safetensors import to_old_format
    new, old = tmp_path / "new", tmp_path / "old"
    shutil.copytree(trained, new); shutil.copytree(trained, old)
    to_old_format(old / CKPT_DIR / ckpt_name(2))
    before = snapshot(old)
    assert torch.equal(torch.cat([p.flatten() for p in load_model(old).state_dict().values()]),
                       torch.cat([p.flatten() for p in load_model(new).state_dict().values()]))
    for d in (new, old):
        r = _train(d, "steps=4")
        assert r.returncode == 0 and f"resumed from {d / CKPT_DIR / ckpt_name(2)}" in (d / "train.log").read_text(), r.stderr[-3000:]
    rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    losses = lambda d: [(x["step"], x["loss"]) for x in rows(d) if "loss" in x]
    assert losses(old) == losses(new) and [s for s, _ in losses(old)][-2:] == [3, 4]
    assert [f.name for f in (old / CKPT_DIR / ckpt_name(4) / "stem_tables").iterdir()] == ["slice-000-of-001.safetensors"]
    assert {k: v for k, v in snapshot(old).items() if k.startswith(f"{CKPT_DIR}/{ckpt_name(2)}/")} == \
           {k: v for k, v in before.items() if k.startswith(f"{CKPT_DIR}/{ckpt_name(2)}/")}


def test_eval_refuses_a_slice_with_a_crafted_safetensors_header(trained, tmp_path):
    "Offsets past the end of the file (the manifest rewritten to match): one message naming the file, exit 2, nothing changed."
    from test_safetensors import rewrite_header
    dump, ck = _dump_copy(trained, tmp_path)
    rewrite_header(ck / SLICE, (ck / SLICE).read_bytes(), lambda h: h["tables.1"].update(data_offsets=[0, 2**40]))
    write_manifest(ck, step=2)
    _refused_by_eval(dump, dump, f"{ck / SLICE} is refused: tensor 'tables.1'")
