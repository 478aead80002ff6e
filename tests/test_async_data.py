"""`data.load_async`: batches prepared by a background thread are those of the synchronous loader, bitwise and in
order, on every rank; `state_dict()` is the position of the batches consumed, however far the worker is ahead; a
restored loader prepares from the restored position; a worker exception surfaces at its batch, naming it; the thread
ends with `close()`, when the loader is collected, and at interpreter exit. End to end: a `stem-nb train` run with
`data.load_async=true` stopped at step 4 and resumed to step 8 has the losses of an uninterrupted async run and of a
synchronous run, exactly."""
import dataclasses, gc, json, subprocess, sys, textwrap, threading, time, weakref
from pathlib import Path

import pytest
import torch

from stem_nb import data
from test_data import _args, _offline                                    # noqa: F401 (autouse fixture: offline, private data dir)
from test_faults_train import CONFIG, ENV, ROOT, TRAIN

WORKER = "PackedLoader.load_async"


def _async(args, depth=2): return dataclasses.replace(args, load_async=True, prefetch_batches=depth)


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)


def _wait_ahead(dl):
    "Wait until the worker has filled its queue: it has prepared `prefetch_batches` batches past those consumed."
    assert _until(lambda: dl._prefetch is not None and dl._prefetch.q.full()), "the load_async worker did not fill its queue"


def _workers(): return [t for t in threading.enumerate() if t.name.startswith(WORKER)]


def _until(pred, timeout=20):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout: return False
        time.sleep(0.001)
    return True


def _in_put(t: threading.Thread) -> bool:
    "Whether thread `t` is waiting in `queue.Queue.put` (for a free slot)."
    f = sys._current_frames().get(t.ident)
    while f is not None:
        if f.f_code.co_name == "put" and f.f_code.co_filename.endswith("queue.py"): return True
        f = f.f_back
    return False


# ---------------------------------------------------------------- the same batches
@pytest.mark.parametrize("kw", [dict(doc_mask=True),                                        # the mixture, with doc_ids
                                dict(sources={"math_code": 1.0}, source_kwargs={"math_code": {"n_docs": 60}},
                                     seq_len=32, batch_size=2)],                              # a tiny source: epochs roll over
                         ids=["mixture", "epochs"])
def test_async_yields_the_sync_batches_on_every_rank(tmp_path, kw):
    args, W = _args(tmp_path, **kw), 3
    n_win = min(data.PackedLoader(args).n_windows.values())
    N = max(25, 2 * n_win // (W * args.batch_size) + 2)                 # a single source goes past two epochs
    for r in range(W):
        sync, asy = data.PackedLoader(args, r, W), data.PackedLoader(_async(args, 3), r, W)
        with asy:
            for k in range(N):
                b, a = next(sync), next(asy)
                assert _same(a, b), f"rank {r}, batch {k}: the async batch differs from the synchronous one"
                assert asy.state_dict() == sync.state_dict(), f"rank {r}, batch {k}: state is not that of the consumed batches"
            assert asy._prefetch.thread.is_alive()
    if len(sync.names) == 1: assert sync.positions["math_code"][0] >= 2, "the batches did not cross two epochs"


# ---------------------------------------------------------------- state and resume
def test_state_taken_with_the_worker_ahead_resumes_exactly(tmp_path):
    args = _args(tmp_path)
    ref = data.PackedLoader(args); want = [next(ref) for _ in range(16)]
    dl = data.PackedLoader(_async(args, 4))
    for k in range(5): assert _same(next(dl), want[k])
    _wait_ahead(dl)                                                      # prepared up to batch 8 (+1 in hand)
    st = json.loads(json.dumps(dl.state_dict()))
    assert st["step"] == 5
    fresh = data.PackedLoader(_async(args)).load_state_dict(st)
    for k in range(5, 16): assert _same(next(fresh), want[k]), f"batch {k} differs after an async resume"
    sync = data.PackedLoader(args).load_state_dict(st)                   # the state is the same for both loaders
    assert _same(next(sync), want[5])
    assert _same(next(dl), want[5])                                      # and the original goes on unaffected
    fresh.close(); dl.close()


@pytest.mark.parametrize("to", [1, 11], ids=["back", "forward"])
def test_load_state_dict_restarts_a_running_worker(tmp_path, to):
    args = _args(tmp_path)
    ref = data.PackedLoader(args); want = [next(ref) for _ in range(14)]
    at = data.PackedLoader(args)
    for _ in range(to): next(at)
    dl = data.PackedLoader(_async(args, 3))
    for _ in range(4): next(dl)
    _wait_ahead(dl); old = dl._prefetch.thread
    dl.load_state_dict(at.state_dict())
    assert not old.is_alive(), "the worker preparing from the old position is still running"
    for k in range(to, to + 3): assert _same(next(dl), want[k]), f"batch {k} after load_state_dict({to})"
    for _ in range(3): next(at)
    assert dl.state_dict() == at.state_dict()
    dl.close()


def test_refused_state_keeps_the_worker(tmp_path):
    args = _args(tmp_path)
    ref = data.PackedLoader(args); want = [next(ref) for _ in range(2)]
    dl = data.PackedLoader(_async(args))
    next(dl); t = dl._prefetch.thread
    with pytest.raises(data.DataError, match="seed"):
        dl.load_state_dict(data.PackedLoader(_args(tmp_path, seed=12)).state_dict())
    assert t.is_alive() and dl.state_dict()["step"] == 1
    assert _same(next(dl), want[1])
    dl.close()


# ---------------------------------------------------------------- faults
def test_worker_exception_is_raised_at_its_batch(tmp_path, monkeypatch):
    args = _args(tmp_path)
    ref = data.PackedLoader(args, 1, 2); want = [next(ref) for _ in range(7)]
    ok, broken = data.PackedLoader._batch, [True]
    def batch(self, step, positions):
        if step == 4 and broken[0]: raise OSError(5, "Input/output error", "tok/bios-train.npy")
        return ok(self, step, positions)
    monkeypatch.setattr(data.PackedLoader, "_batch", batch)
    dl = data.PackedLoader(_async(args, 3), 1, 2)
    for k in range(4): assert _same(next(dl), want[k])                   # the batches before it are delivered
    t = dl._prefetch.thread
    with pytest.raises(data.DataError) as e:
        next(dl)
    assert str(e.value) == (f"data.load_async: the background worker ({WORKER} rank 1) failed preparing batch 4: "
                            "OSError: [Errno 5] Input/output error: 'tok/bios-train.npy'")
    assert isinstance(e.value.__cause__, OSError)                          # the worker's traceback is kept
    assert not t.is_alive() and dl.state_dict()["step"] == 4
    broken[0] = False                                                    # the fault is gone: the next call resumes there
    for k in range(4, 7): assert _same(next(dl), want[k])
    dl.close()


def test_failed_worker_does_not_keep_its_loader_alive(tmp_path, monkeypatch):
    "A worker that failed while its queue is full waits without holding its loader: dropping the loader ends it."
    ok, failed = data.PackedLoader._batch, threading.Event()
    def batch(self, step, positions):
        if step == 2: failed.set(); raise ValueError("bad window")
        return ok(self, step, positions)
    monkeypatch.setattr(data.PackedLoader, "_batch", batch)
    dl = data.PackedLoader(_async(_args(tmp_path), 1))
    next(dl); _wait_ahead(dl)                                            # batch 1 waits in the queue, batch 2 failed
    t, ref = dl._prefetch.thread, weakref.ref(dl)
    assert failed.wait(10) and _until(lambda: _in_put(t)), "the worker did not fail and wait for a slot"
    del dl; gc.collect()
    assert ref() is None, "the failed worker's traceback keeps the loader alive"
    t.join(5); assert not t.is_alive()


def test_worker_ends_on_close_collection_and_with(tmp_path):
    args = _async(_args(tmp_path))
    before = set(_workers())
    dl = data.PackedLoader(args)
    assert dl._prefetch is None and set(_workers()) == before           # no thread before the first batch
    next(dl); _wait_ahead(dl)
    t = dl._prefetch.thread; dl.close()
    assert not t.is_alive() and t not in _workers()
    next(dl); _wait_ahead(dl); t = dl._prefetch.thread                  # a later next() starts a new one
    assert t.is_alive()
    del dl; gc.collect()
    t.join(5); assert not t.is_alive(), "the worker outlived its garbage-collected loader"
    with data.PackedLoader(args) as dl:
        next(dl); t = dl._prefetch.thread
    assert not t.is_alive()
    assert set(_workers()) == before


def test_interpreter_exits_cleanly_with_workers_running(tmp_path):
    """A script that never closes its async loaders exits at once and cleanly, whether their workers wait on a full queue
    or are busy preparing batches: they are stopped and joined at exit (a daemon thread left to the exiting interpreter
    is frozen wherever it is, and frozen inside a torch call it aborts the process)."""
    code = textwrap.dedent(f'''
        import atexit, threading
        def alive():                # registered first: runs after the atexit hooks registered later (weakref.finalize's)
            print("alive at exit", sum(t.name.startswith("{WORKER}") for t in threading.enumerate()), flush=True)
        atexit.register(alive)
        import time
        from stem_nb.data import DataArgs, PackedLoader
        kw = dict(sources={{"bios": 1.0, "math_code": 1.0}}, tokenizer="byte", load_async=True, doc_mask=True,
                  cache_dir={str(tmp_path / 'tok')!r}, source_kwargs={{"bios": {{"n_people": 500}}}})
        waiting = PackedLoader(DataArgs(seq_len=32, batch_size=2, **kw))
        next(waiting)
        while not waiting._prefetch.q.full(): time.sleep(0.001)
        busy = [PackedLoader(DataArgs(seq_len=256, batch_size=16, prefetch_batches=10**6, **kw), r, 4) for r in range(4)]
        class Slow(PackedLoader):                      # its worker is mid-batch for 0.5 s at exit
            def _batch(self, step, positions):
                if step: time.sleep(0.5)
                return super()._batch(step, positions)
        slow = Slow(DataArgs(seq_len=32, batch_size=2, **kw))
        for dl in [*busy, slow]: next(dl)
        time.sleep(0.05)
        print("running", sum(dl._prefetch.thread.is_alive() for dl in [waiting, *busy, slow]), flush=True)
    ''')
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, f"exit code {r.returncode}: {r.stderr[-3000:]}"
    assert r.stdout.splitlines() == ["running 6", "alive at exit 0"] and r.stderr == "", r.stdout + r.stderr[-3000:]
    assert time.time() - t0 < 60


def test_prefetch_batches_is_checked():
    with pytest.raises(data.ConfigError, match=r"data.prefetch_batches=0: must be an integer >= 1"):
        data.DataArgs(prefetch_batches=0)


# ---------------------------------------------------------------- end to end: stem-nb train
OVR = ["checkpoint.every=4", "checkpoint.keep=0", "eval_every=0", "val_batches=0", "log_every=1", "progress=none",
       "optim.schedule=constant"]                          # constant lr: a 4-step run is the first half of an 8-step one


def _train(dump, *extra):
    r = subprocess.run([*TRAIN, f"dump_dir={dump}", *OVR, *extra], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _losses(dump):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(dump) / "metrics.jsonl").read_text().splitlines())}


def test_train_async_resume_equals_uninterrupted_and_sync(tmp_path):
    stopped = tmp_path / "stopped"
    s = _train(stopped, "steps=4", "data.load_async=true")
    assert s["step"] == 4 and s["checkpoint"].endswith("0000000004")
    s = _train(stopped, "steps=8", "data.load_async=true")              # the same run, resumed from step 4's checkpoint
    assert s["resumed_from"].endswith("0000000004") and s["step"] == 8
    whole = tmp_path / "async"; _train(whole, "steps=8", "data.load_async=true")
    sync = tmp_path / "sync"; _train(sync, "steps=8")
    got, ref, syn = _losses(stopped), _losses(whole), _losses(sync)
    assert sorted(got) == sorted(ref) == sorted(syn) == list(range(1, 9))
    assert got == ref, {k: (got[k], ref[k]) for k in ref if got[k] != ref[k]}      # bitwise, steps 5-8 after the resume
    assert ref == syn, {k: (ref[k], syn[k]) for k in ref if ref[k] != syn[k]}
    assert len(set(got.values())) == 8                                   # and not trivially: the losses move
