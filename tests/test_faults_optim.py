"""Faults of the table optimizer's state, met as a user (or an attacker who hands over a checkpoint) would meet them.
A table-optimizer state with moments of one row, half the width, a one-element `row_step`, a huge `step`,
a short `history`, a wrong dtype, or `row_step` outside [origin, step] must be refused with a `ValueError` naming the
key, the expected and the found value: at `load_state_dict`, and, when set directly past it, at the next settle and
step, on the numba kernel path and on the torch path alike, and by the kernel's own checks at its entry. These run in
a child process, so a memory fault shows as exit -11 and fails the test instead of killing pytest. Also: token ids
that are not integers or not in [0, V) (the same error on both paths), non-finite optimizer settings (refused at config
time, from the command line too), and a crafted table slice in the newest checkpoint (resume names it and falls back
to the previous checkpoint)."""
import json, math, os, shutil, subprocess, sys
from pathlib import Path

import pytest, torch
from torch import nn

from stem_nb.checkpoint import MANIFEST, write_manifest
from stem_nb.tensor_files import load_tensor_file, save_tensor_file
from stem_nb.config import ConfigError
from stem_nb.optim import OptimArgs
from stem_nb.row_kernel import NUMBA_ROWS
from stem_nb.table_adamw import TableAdamW
from test_faults_train import ENV, ROOT, digest, run, steps_of

PREFIX = "ValueError: TableAdamW: state of the table of param group 0 (mode 'exact'): "
# case -> the error's text after PREFIX (the table is [64, 8], trained 3 steps: row_step in [0, 3], history of 1024 rows)
EXPECTED = {
    "one-row moments": "'exp_avg': expected shape (64, 8), found (1, 8)",
    "half-width moments": "'exp_avg_sq': expected shape (64, 8), found (64, 4)",
    "one-element row_step": "'row_step': expected shape (64,), found (1,)",
    "huge step": "'history': expected at least step - origin + 1 = 1000000000001 rows, found 1024",
    "step past 2^53": "'step': expected 0 <= step <= 2^53, found 4611686018427387904",
    "short history": "'history': expected at least step - origin + 1 = 4 rows, found 2",
    "wrong dtype": "'row_step': expected dtype torch.int64, found torch.float64",
    "row_step > step": "'row_step': expected every value in [origin = 0, step = 3], found values in [0, 8]",
    "negative row_step": "'row_step': expected every value in [origin = 0, step = 3], found values in [-1, 3]",
}

# The child: for every case, a healthy state spoiled one way, (1) through `load_state_dict`, (2) set directly, then
# `settle` and `step`. argv: the kernel ("numba" / "torch"), and "unchecked" to switch off the per-step state check in
# Python, leaving the kernel's own checks at its entry alone in the way. One JSON line per case.
CHILD = r'''
import json, sys, torch
from torch import nn
from stem_nb.row_kernel import NUMBA_ROWS
from stem_nb.table_adamw import TableAdamW
kernel, unchecked = sys.argv[1], sys.argv[2:] == ["unchecked"]

def at(k, row, value):
    def spoil(st):
        v = st[k].clone(); v[row] = value; return {**st, k: v}
    return spoil

CASES = {"one-row moments": lambda st: {**st, "exp_avg": st["exp_avg"][:1].clone()},
         "half-width moments": lambda st: {**st, "exp_avg_sq": st["exp_avg_sq"][:, :4].clone()},
         "one-element row_step": lambda st: {**st, "row_step": st["row_step"][:1].clone()},
         "huge step": lambda st: {**st, "step": torch.tensor(10 ** 12)},
         "step past 2^53": lambda st: {**st, "step": torch.tensor(2 ** 62)},
         "short history": lambda st: {**st, "history": st["history"][:2].clone()},
         "wrong dtype": lambda st: {**st, "row_step": st["row_step"].double()},
         "row_step > step": at("row_step", 5, 8),
         "negative row_step": at("row_step", 5, -1)}

def trained():
    torch.manual_seed(0)
    e = nn.Embedding(64, 8, sparse=True); o = TableAdamW(e.parameters(), lr=1e-2, kernel=kernel, row_kernel=NUMBA_ROWS)
    for s in range(3): o.zero_grad(); e(torch.tensor([1, 2, 5, 9 + s])).sum().backward(); o.step()
    if unchecked: o._check_state = lambda p, st, group: None
    return e, o

def attempt(fn):
    try: fn(); return None
    except Exception as ex: return f"{type(ex).__name__}: {ex}"

for name, spoil in CASES.items():
    if unchecked and name == "wrong dtype": continue           # the kernel never sees it: an int64 row_step is what it serves
    e, o = trained()
    before = {k: v.clone() for k, v in o.state[e.weight].items()}
    sd = o.state_dict(); sd["state"][0] = spoil({k: v.clone() for k, v in sd["state"][0].items()})
    load = attempt(lambda: o.load_state_dict(sd))
    kept = all(torch.equal(o.state[e.weight][k], v) for k, v in before.items())
    o.state[e.weight] = spoil({k: v.clone() for k, v in o.state[e.weight].items()})     # past the load
    settle = attempt(lambda: o.settle(torch.tensor([5, 9, 5])))
    o.zero_grad(); e(torch.tensor([5, 9, 5])).sum().backward()
    step = attempt(lambda: o.step())
    print(json.dumps(dict(case=name, load=load, kept=kept, settle=settle, step=step)), flush=True)
'''


@pytest.fixture(scope="module")
def child():
    "{pass: (exit code, stderr, {case: its JSON line})} for the passes numba, torch and numba with only the kernel's checks."
    out = {}
    for name, argv in (("numba", ["numba"]), ("torch", ["torch"]), ("kernel-only", ["numba", "unchecked"])):
        r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
        rows = {d["case"]: d for d in map(json.loads, r.stdout.splitlines())}
        out[name] = (r.returncode, r.stderr, rows)
    return out


def result(child, name, case) -> dict:
    rc, err, rows = child[name]
    assert case in rows, f"the {name} child exited {rc} before case {case!r} finished (-11: a memory fault): {err[-3000:]}"
    return rows[case]


@pytest.mark.parametrize("kernel", ["numba", "torch"])
@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_state_refused_at_load_and_at_step(child, case, kernel):
    r = result(child, kernel, case)
    assert r["load"] is not None and r["load"].startswith(PREFIX + EXPECTED[case]), r["load"]
    assert r["kept"], "a refused load_state_dict changed the optimizer's state"
    for when in ("settle", "step"):                       # set directly: refused before anything is read or written
        assert r[when] is not None and r[when].startswith(PREFIX + EXPECTED[case]), (when, r[when])
    assert child[kernel][0] == 0, child[kernel][1][-3000:]


@pytest.mark.parametrize("case", list(EXPECTED))
def test_kernel_and_torch_paths_raise_the_same_error(child, case):
    k, t = result(child, "numba", case), result(child, "torch", case)
    assert (k["load"], k["settle"], k["step"]) == (t["load"], t["settle"], t["step"])


@pytest.mark.parametrize("case", [c for c in EXPECTED if c != "wrong dtype"])
def test_the_kernel_checks_at_its_entry(child, case):
    "With the per-step check in Python switched off, the kernel's own entry checks refuse the state, with the same error."
    r = result(child, "kernel-only", case)
    for when in ("settle", "step"):
        assert r[when] is not None and r[when].startswith(PREFIX + EXPECTED[case]), (when, r[when])
    assert child["kernel-only"][0] == 0, child["kernel-only"][1][-3000:]


def test_validate_state_is_the_loaders_check():
    "`validate_state(p, state)`, as a checkpoint loader calls it: a sound state passes, an empty one too (never stepped)."
    e = nn.Embedding(64, 8, sparse=True); o = TableAdamW([{"params": [e.weight], "name": "stem_tables.1"}], lr=1e-2)
    o.zero_grad(); e(torch.tensor([1, 2])).sum().backward(); o.step()
    st = o.state[e.weight]
    o.validate_state(e.weight, st); o.validate_state(e.weight, {})
    with pytest.raises(ValueError, match=r"state of table 'stem_tables.1' \(mode 'exact'\): 'row_step': expected shape \(64,\), found \(1,\)"):
        o.validate_state(e.weight, {**st, "row_step": st["row_step"][:1]})
    with pytest.raises(ValueError, match="'decay_at': expected no such key"):
        o.validate_state(e.weight, {**st, "decay_at": st["row_step"].double()})
    with pytest.raises(ValueError, match="expected a dict of tensors, found a list"): o.validate_state(e.weight, [])
    with pytest.raises(ValueError, match="not a table of this optimizer"): o.validate_state(nn.Parameter(torch.zeros(64, 8)), st)


@pytest.mark.parametrize("mode", ["row_local", "dense"])
def test_other_modes_validated_at_load(mode):
    e = nn.Embedding(64, 8, sparse=True); o = TableAdamW(e.parameters(), lr=1e-2, mode=mode)
    for s in range(3): o.zero_grad(); e(torch.tensor([1, 2 + s])).sum().backward(); o.step()
    sd = o.state_dict(); st = sd["state"][0]
    o.load_state_dict(sd)
    sd["state"][0] = {**st, "exp_avg": st["exp_avg"][:, :4].clone()}
    with pytest.raises(ValueError, match=rf"\(mode '{mode}'\): 'exp_avg': expected shape \(64, 8\), found \(64, 4\)"): o.load_state_dict(sd)
    sd["state"][0] = {**st, "step": torch.tensor(-1)}
    with pytest.raises(ValueError, match=r"'step': expected 0 <= step <= 2\^53, found -1"): o.load_state_dict(sd)
    if mode == "row_local":
        sd["state"][0] = {**st, "row_step": st["row_step"] + 5}
        with pytest.raises(ValueError, match=r"'row_step': expected every value in \[0, step = 3\], found values in \[5, 8\]"):
            o.load_state_dict(sd)


# -- token ids --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ids, msg", [
    (torch.tensor([1.0, 2.7]), "TableAdamW.settle: token ids must be an integer tensor, got torch.float32"),
    (torch.tensor([True, False]), "TableAdamW.settle: token ids must be an integer tensor, got torch.bool"),
    (torch.tensor([3, 64]), "TableAdamW.settle: token ids must be in [0, 64) (the table's rows), found ids in [3, 64]"),
    (torch.tensor([[-1, 3]]), "TableAdamW.settle: token ids must be in [0, 64) (the table's rows), found ids in [-1, 3]")])
@pytest.mark.parametrize("mode", ["exact", "row_local"])
def test_settle_refuses_bad_ids_the_same_on_both_paths(ids, msg, mode):
    "The numba path used to truncate 2.7 to row 2 where the torch path raised: both refuse now, with one message, changing nothing."
    for kernel in ("numba", "torch"):
        e = nn.Embedding(64, 8, sparse=True); o = TableAdamW(e.parameters(), lr=1e-2, mode=mode, kernel=kernel, row_kernel=NUMBA_ROWS)
        for s in range(3): o.zero_grad(); e(torch.tensor([1, 2 + s])).sum().backward(); o.step()
        w, rs = e.weight.detach().clone(), o.state[e.weight]["row_step"].clone()
        with pytest.raises(ValueError) as ex: o.settle(ids)
        assert str(ex.value) == msg, (kernel, str(ex.value))
        assert torch.equal(e.weight.data, w) and torch.equal(o.state[e.weight]["row_step"], rs)


# -- optimizer settings -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("eps", math.inf), ("clip", math.nan), ("lr", math.inf), ("weight_decay", math.nan),
                                        ("beta1", math.nan), ("lr_min_ratio", math.inf), ("table_lr", math.nan)])
def test_non_finite_settings_refused(key, value):
    with pytest.raises(ConfigError, match=f"optim.{key} must be a finite number, got {value}"): OptimArgs(**{key: value})


def test_non_integer_warmup_refused():
    with pytest.raises(ConfigError, match="optim.warmup must be an integer"): OptimArgs(warmup=2.5)


@pytest.mark.parametrize("override", ["optim.eps=inf", "optim.clip=nan"])
def test_non_finite_settings_refused_from_the_command_line(tmp_path, override):
    d = tmp_path / "run"
    r = run(d, override, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert override.split("=")[0] in r.stderr and "finite" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not d.exists()                                                # refused before anything was written


# -- a crafted checkpoint, end to end ---------------------------------------------------------------------------------

def craft_row_step(ckpt: Path) -> str:
    "Give the first table of checkpoint `ckpt` a one-element `row_step` and re-write its MANIFEST to match (anyone can); returns the table."
    f = ckpt / "stem_tables" / "slice-000-of-001.safetensors"
    obj = load_tensor_file(f)
    name = sorted(obj["optim"])[0]
    obj["optim"][name]["row_step"] = obj["optim"][name]["row_step"][:1].clone()
    save_tensor_file(f, obj)
    man = json.loads((ckpt / MANIFEST).read_text())
    write_manifest(ckpt, **{k: v for k, v in man.items() if k not in ("format", "created", "files")})
    return name


def losses(d) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(d) / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_resume_refuses_a_crafted_row_step_and_falls_back(tmp_path):
    d = tmp_path / "run"
    r = run(d, "steps=4", "checkpoint.every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(d)
    ck = d / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["0000000002", "0000000004"]
    craft_row_step(ck / "0000000004")
    ck2 = digest(ck / "0000000002")
    r = run(d, "steps=6", "checkpoint.every=2")
    assert r.returncode == 0, f"exit {r.returncode} (-11: a memory fault): {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    log = (d / "train.log").read_text()
    warn = [l for l in log.splitlines() if "0000000004" in l and "'row_step'" in l]
    assert warn and "'row_step': expected shape (4096,), found (1,)" in warn[0], log[-3000:]   # the corrupt checkpoint is named, with why
    assert json.loads(r.stdout.strip().splitlines()[-1])["resumed_from"].endswith("0000000002")
    assert digest(ck / "0000000002") == ck2
    assert steps_of(d) == list(range(1, 7))
    assert losses(d)[3] == ref[3]                                         # step 3 starts from checkpoint 2, bit for bit
