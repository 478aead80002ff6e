"Optimizers: TableAdamW (exact = dense AdamW at row-sparse cost, row_local, dense), ModelOptimizer, the global clip."
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import io, json, math

import pytest, torch
from torch import nn

from stem_nb.config import ConfigError, load_config
from stem_nb.model import Transformer, preset
from stem_nb.optim import OptimArgs, ModelOptimizer, clip_grad_norm_, grad_sq_norm, lr_at, param_groups
from stem_nb.table_adamw import TableAdamW, TABLE_OPTIMIZERS, compact_rows, exact_window
from stem_nb.row_kernel import NUMBA_ROWS

KW = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def table_adamw(params, **kw) -> TableAdamW:
    "TableAdamW as ModelOptimizer builds it: the CPU row kernel where it serves the table (kernel='torch': never)."
    return TableAdamW(params, row_kernel=NUMBA_ROWS, **kw)
LRS = [1e-2, 3e-2, 2e-2, 5e-3, 1e-2, 4e-2, 2e-2, 1e-2]


def tables(V=24, H=6, seed=0, sparse=(True, False), dtype=torch.float32):
    torch.manual_seed(seed); w0 = torch.randn(V, H, dtype=dtype)
    return [nn.Embedding.from_pretrained(w0.clone(), freeze=False, sparse=s) for s in sparse]


def backward(emb, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    (emb(tokens) * torch.randn(*tokens.shape, emb.weight.shape[1], generator=g, dtype=emb.weight.dtype)).sum().backward()


def run_pair(batch, mode, V=24, H=6, steps=8, settle=True):
    "table_adamw(mode) on a sparse-grad table vs torch AdamW on a dense-grad copy (zero grads for missed rows)."
    es, ed = tables(V, H)
    o, od = table_adamw(es.parameters(), lr=1.0, mode=mode, **KW), torch.optim.AdamW(ed.parameters(), lr=1.0, **KW)
    for s in range(steps):
        torch.manual_seed(100 + s); tok = batch(s, V)
        for e, opt in ((es, o), (ed, od)):
            opt.param_groups[0]["lr"] = LRS[s]
            opt.zero_grad(set_to_none=True); backward(e, tok, s); opt.step()
    if settle: o.settle()
    return es, ed, o, od


def every_row(s, V):   # all ids, some twice (duplicates must be summed)
    return torch.cat([torch.randperm(V), torch.randint(0, V, (9,))]).view(3, -1)


def few(s, V): return torch.randint(0, V // 2, (5,))


@pytest.mark.parametrize("mode", TABLE_OPTIMIZERS)
def test_every_mode_equals_adamw_when_every_row_touched(mode):
    es, ed, o, od = run_pair(every_row, mode)
    torch.testing.assert_close(es.weight.data, ed.weight.data, atol=1e-6, rtol=1e-6)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(o.state[es.weight][k], od.state[ed.weight][k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "dense"])
def test_exact_and_dense_equal_adamw_with_missing_rows(mode):
    es, ed, o, od = run_pair(few, mode)
    torch.testing.assert_close(es.weight.data, ed.weight.data, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(o.state[es.weight]["exp_avg"], od.state[ed.weight]["exp_avg"], atol=1e-7, rtol=1e-6)


def test_row_local_is_not_adamw_with_missing_rows():
    es, ed, _, _ = run_pair(few, "row_local")
    assert (es.weight.data[:12] - ed.weight.data[:12]).abs().max() > 1e-4


def zipf_rel_error(mode, V=400, H=16, steps=150, n=64, dtype=torch.float32):
    "Max over rows of max|w - w_AdamW| / max|w_AdamW| after Zipf-sparse steps, warmup + cosine lr, wd 0.1 (reference: fp32 AdamW)."
    (es, ed), a = tables(V, H), OptimArgs(lr=1e-2, warmup=15, weight_decay=0.1)
    es = es.to(dtype)
    kw = dict(lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps, weight_decay=a.weight_decay)
    o, od = table_adamw(es.parameters(), mode=mode, **kw), torch.optim.AdamW(ed.parameters(), **kw)
    gen = torch.Generator().manual_seed(0)
    p = torch.arange(1, V + 1, dtype=torch.float64).pow_(-1.1)
    for s in range(steps):
        tok = torch.multinomial(p, n, replacement=True, generator=gen); gv = torch.randn(n, H, generator=gen)
        for e, opt in ((es, o), (ed, od)):
            opt.param_groups[0]["lr"] = lr_at(s, steps, a)
            if opt is o: o.settle(tok)
            opt.zero_grad(); (e(tok) * gv.to(e.weight.dtype)).sum().backward(); opt.step()
    o.settle()
    return ((es.weight.float() - ed.weight).abs().amax(1) / ed.weight.abs().amax(1)).max().item()


def test_exact_matches_adamw_on_zipf_run_and_row_local_does_not():
    assert zipf_rel_error("exact") < 1e-5
    assert zipf_rel_error("row_local") > 1e-3


def test_exact_in_bf16_computes_in_fp32():
    "A bf16 table is updated in fp32 and rounded once: after settle + two steps it equals the fp32 table rounded to bf16 within 1 ulp."
    e16, e32 = [nn.Embedding.from_pretrained(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).bfloat16().to(d),
                                             freeze=False, sparse=True) for d in (torch.bfloat16, torch.float32)]
    o16, o32 = (table_adamw(e.parameters(), lr=1e-2, **KW) for e in (e16, e32))
    for s, tok in enumerate(([1, 2, 2], [3, 1])):
        g = torch.randn(len(tok), 4, generator=torch.Generator().manual_seed(s)).bfloat16()
        for e, o in ((e16, o16), (e32, o32)):
            o.zero_grad(); (e(torch.tensor(tok)) * g.to(e.weight.dtype)).sum().backward(); o.step()
    assert o16.state[e16.weight]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(e16.weight.data.float(), e32.weight.data.bfloat16().float(), atol=0, rtol=2 ** -7)


def one_touch(mode, steps=80, at=50):           # 0-based step 50 of 80
    es, ed = tables(V=4, H=1)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    o = table_adamw(es.parameters(), mode=mode, **kw) if mode else torch.optim.AdamW(ed.parameters(), **kw)
    e = es if mode else ed
    with torch.no_grad(): e.weight[2] = 0.0
    for s in range(steps):
        o.zero_grad(); backward(e, torch.tensor([0] + ([2] if s == at else [])), s); o.step()
    if mode: o.settle()
    return abs(e.weight[2].item())


def test_issue_example_one_row_touched_once():
    ref = one_touch(None)
    assert ref == pytest.approx(0.0508, abs=5e-5)
    assert one_touch("exact") == pytest.approx(ref, rel=1e-6)
    assert one_touch("row_local") == pytest.approx(0.0097, abs=5e-5)


def test_eps_error_tiny_gradients_exact():
    "One row touched once, then 40 missed steps: the settle gives AdamW's movement at every gradient scale down to 1e-10."
    b1, b2, eps, k = 0.9, 0.95, 1e-8, 40
    for scale in (1.0, 1e-4, 1e-6, 1e-8, 1e-9, 1e-10):
        es, ed = tables(V=2, H=3, dtype=torch.float64)
        kw = dict(lr=1e-2, betas=(b1, b2), eps=eps, weight_decay=0.0)
        o, od = table_adamw(es.parameters(), mode="exact", kernel="torch", **kw), torch.optim.AdamW(ed.parameters(), **kw)
        g1 = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64) * scale
        for s in range(1 + k):
            rows = torch.tensor([0, 1] if s == 0 else [0])
            vals = torch.stack([torch.ones(3, dtype=torch.float64), g1])[: rows.numel()]
            es.weight.grad = torch.sparse_coo_tensor(rows[None], vals, (2, 3), check_invariants=False)
            ed.weight.grad = es.weight.grad.to_dense(); o.step(); od.step()
            if s == 0: w1 = ed.weight[1].detach().clone()
        o.settle()
        err = ((es.weight[1] - ed.weight[1]).abs() / (ed.weight[1] - w1).abs()).max().item()
        assert err < 1e-10, (scale, err)


def test_dense_grad_in_exact_mode_is_adamw():
    ed1, ed2 = tables(sparse=(False, False))
    o1, o2 = table_adamw(ed1.parameters(), lr=1e-2, **KW), torch.optim.AdamW(ed2.parameters(), lr=1e-2, **KW)
    for s in range(4):
        for e, o in ((ed1, o1), (ed2, o2)): o.zero_grad(); backward(e, torch.tensor([1, 2, 2]), s); o.step()
    torch.testing.assert_close(ed1.weight.data, ed2.weight.data, atol=1e-6, rtol=1e-6)


def test_row_local_lazy_decay_is_exact_product_and_untouched_rows_unwritten():
    (es,) = tables(sparse=(True,)); w0 = es.weight.detach().clone().double()
    opt = table_adamw(es.parameters(), lr=1.0, mode="row_local", **KW)
    snap = None
    for s, lr in enumerate(LRS):
        opt.param_groups[0]["lr"] = lr; opt.zero_grad()
        backward(es, torch.tensor([0, 1] + ([9] if s == 7 else [])), s)
        if s == 7: g9 = es.weight.grad.to_dense()[9].double()
        if s == 1: snap = (es.weight.detach().clone(), {k: v.clone() for k, v in opt.state[es.weight].items()})
        opt.step()
    decay = math.prod(1 - lr * 0.1 for lr in LRS)
    torch.testing.assert_close(es.weight.data[9].double(), w0[9] * decay - LRS[-1] * g9 / (g9.abs() + 1e-8),
                               atol=1e-6, rtol=1e-6)
    w1, st1 = snap
    st = opt.state[es.weight]
    assert torch.equal(es.weight.data[5], w1[5]) and torch.equal(es.weight.data[5], w0[5].float())
    for k in ("exp_avg", "exp_avg_sq", "row_step", "decay_at"): assert torch.equal(st[k][5], st1[k][5]), k
    assert st["row_step"][[0, 9, 5]].tolist() == [8, 1, 0]
    opt.settle(torch.tensor([5]))
    torch.testing.assert_close(es.weight.data[5].double(), w0[5] * decay, atol=1e-6, rtol=1e-6)


def test_exact_settle_idempotent_untouched_rows_unread_and_trim():
    es, ed, o, _ = run_pair(few, "exact", settle=False)
    st = o.state[es.weight]
    assert int(st["step"]) == 8 and st["row_step"][12:].tolist() == [0] * 12       # upper half never read or written
    o.settle(torch.tensor([20, 20, 3])); w1 = es.weight.detach().clone()
    o.settle(torch.tensor([20])); assert torch.equal(es.weight.data, w1)
    o.settle()
    assert st["row_step"].tolist() == [8] * 24 and int(st["origin"]) == 8 and st["history"].shape[0] == 1025
    torch.testing.assert_close(es.weight.data, ed.weight.data, atol=1e-6, rtol=1e-6)


def test_exact_past_the_window_and_after_trim():
    "Rows idle longer than the window (tail sums F) and a trim in the middle stay exact (float64, eps -> 0)."
    b = (0.5, 0.9)          # short window: W = 79 steps
    es, ed = tables(V=6, H=3, dtype=torch.float64)
    kw = dict(lr=1e-2, betas=b, eps=1e-30, weight_decay=0.1)
    o, od = table_adamw(es.parameters(), mode="exact", **kw), torch.optim.AdamW(ed.parameters(), **kw)
    assert exact_window(*b) < 100
    for s in range(300):
        tok = torch.tensor([0] + ([1] if s % 97 == 0 else []) + ([2] if s in (5, 250) else []))
        for e, opt in ((es, o), (ed, od)):
            opt.param_groups[0]["lr"] = 1e-2 * (1 + math.sin(s))
            opt.zero_grad(); backward(e, tok, s); opt.step()
        if s == 150: o.settle()
    o.settle()
    torch.testing.assert_close(es.weight.data, ed.weight.data, atol=1e-12, rtol=1e-10)


def non_tensors(x):
    if torch.is_tensor(x): return []
    if isinstance(x, dict): return [v for y in x.values() for v in non_tensors(y)]
    if isinstance(x, (list, tuple)): return [v for y in x for v in non_tensors(y)]
    return [x]


@pytest.mark.parametrize("mode", TABLE_OPTIMIZERS)
def test_table_state_dict_roundtrip_weights_only(mode):
    def run(e, o, a, b):
        for s in range(a, b):
            o.zero_grad(); torch.manual_seed(s); backward(e, torch.randint(0, 10, (6,)), s); o.step()
    (e1,) = tables(sparse=(True,)); o1 = table_adamw(e1.parameters(), lr=1e-2, mode=mode, **KW); run(e1, o1, 0, 4)
    json.dumps(non_tensors(o1.state_dict()))
    buf = io.BytesIO(); torch.save({"w": e1.weight.detach(), "opt": o1.state_dict()}, buf); buf.seek(0)
    ck = torch.load(buf, weights_only=True)   # torch.load, justified: the check is that torch's weights-only loader takes the state
    (e2,) = tables(seed=3, sparse=(True,)); o2 = table_adamw(e2.parameters(), lr=5.0, mode=mode, **KW)
    with torch.no_grad(): e2.weight.copy_(ck["w"])
    o2.load_state_dict(ck["opt"])
    assert o2.param_groups[0]["lr"] == 1e-2
    assert {k: v.dtype for k, v in o2.state[e2.weight].items()} == {k: v.dtype for k, v in o1.state[e1.weight].items()}
    run(e1, o1, 4, 7); run(e2, o2, 4, 7); o1.settle(); o2.settle()
    assert torch.equal(e1.weight.data, e2.weight.data)
    bad = o1.state_dict(); bad["state"][0] = {**bad["state"][0], "exp_avg": torch.zeros(3, 6)}
    with pytest.raises(ValueError, match="exp_avg"): o2.load_state_dict(bad)
    other = "dense" if mode != "dense" else "exact"
    with pytest.raises(ValueError, match=f"table_optimizer={mode}"):
        table_adamw(e2.parameters(), mode=other, **KW).load_state_dict(o1.state_dict())


def stem_model(seed=0):
    return Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=64, seed=seed))


def train(m, o, args, a, b):
    for s in range(a, b):
        torch.manual_seed(s % 3); x = torch.randint(0, 40, (2, 17))
        o.set_lr(s); o.settle(x); m(x[:, :-1], x[:, 1:]).backward()
        o.clip_grad_norm_(args.clip); o.step(); o.zero_grad()


@pytest.mark.parametrize("mode", TABLE_OPTIMIZERS)
def test_model_optimizer_resume_mid_run_is_identical(mode):
    args = OptimArgs(lr=1e-2, warmup=2, table_optimizer=mode)
    m1 = stem_model(); o1 = ModelOptimizer(m1, args, total_steps=8); train(m1, o1, args, 0, 8)
    m2 = stem_model(); o2 = ModelOptimizer(m2, args, total_steps=8); train(m2, o2, args, 0, 4)
    buf = io.BytesIO(); torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf); buf.seek(0)
    hp = json.loads(json.dumps(o2.hparams()))
    ck = torch.load(buf, weights_only=True)   # torch.load, justified: the check is that torch's weights-only loader takes the state
    m3 = stem_model(seed=9); m3.load_state_dict(ck["model"])
    o3 = ModelOptimizer(m3, args, total_steps=8); o3.load_state_dict(ck["opt"]); o3.load_hparams(hp)
    train(m3, o3, args, 4, 8)
    o1.settle(); o3.settle()
    for (n, p), q in zip(m1.named_parameters(), m3.parameters()): assert torch.equal(p.data, q.data), n


def test_model_optimizer_groups_lr_hparams():
    m = stem_model()
    o = ModelOptimizer(m, OptimArgs(lr=1e-3, table_lr=2e-3, warmup=10, table_optimizer="dense"), total_steps=100)
    names = {id(p): n for n, p in m.named_parameters()}
    g = {x["name"]: [names[id(p)] for p in x["params"]] for x in o.backbone.param_groups}
    assert "tok_embeddings.weight" in g["decay"] and "output.weight" in g["decay"]
    assert all(p.endswith("norm.weight") for p in g["no_decay"])
    assert [x["name"] for x in o.tables.param_groups] == [f"stem_tables.{k}" for k in m.stem_tables]
    assert all(x["mode"] == "dense" for x in o.tables.param_groups)
    assert o.set_lr(4) == pytest.approx(5e-4)
    assert [x["lr"] for x in o.tables.param_groups] == pytest.approx([1e-3] * len(m.stem_tables))
    h = o.hparams(); json.dumps(h)
    o.set_lr(50); o.load_hparams(h)
    assert [x["lr"] for x in o.tables.param_groups] == pytest.approx([1e-3] * len(m.stem_tables))
    with pytest.raises(ValueError, match="do not match"): o.load_hparams(h[:-1])
    assert ModelOptimizer(Transformer(preset("debug", vocab_size=64)), OptimArgs(), 10).tables is None
    with pytest.raises(TypeError, match="backbone_parameters"): ModelOptimizer(m.stem_tables, OptimArgs(), 10)


def test_fused_backbone_equals_for_loop():
    args = OptimArgs(lr=1e-2, warmup=2)
    ms = [stem_model(), stem_model()]
    os_ = [ModelOptimizer(ms[0], args, 6, fused=True), ModelOptimizer(ms[1], args, 6, fused=False)]
    assert os_[0].backbone.defaults["fused"] is True and not os_[1].backbone.defaults["fused"]
    for m, o in zip(ms, os_): train(m, o, args, 0, 3)
    for p, q in zip(ms[0].parameters(), ms[1].parameters()): torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_clip_matches_torch_on_densified():
    m = stem_model()
    torch.manual_seed(0); x = torch.randint(0, 64, (2, 33))
    m(x[:, :-1], x[:, 1:]).backward()
    ref = []
    for p in m.parameters():
        r = nn.Parameter(torch.zeros_like(p)); r.grad = (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone(); ref.append(r)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 0.05)
    n = ModelOptimizer(m, OptimArgs(), 10).clip_grad_norm_(0.05)
    assert n > 0.05
    torch.testing.assert_close(n, n_ref, atol=1e-5, rtol=1e-5)
    for p, r in zip(m.parameters(), ref):
        torch.testing.assert_close(p.grad.to_dense() if p.grad.is_sparse else p.grad, r.grad, atol=1e-7, rtol=1e-5)


def test_clip_sums_duplicates_before_squaring_and_hooks():
    (e,) = tables(V=4, H=2, sparse=(True,))
    e.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.tensor([[3.0, 0.0], [1.0, 0.0]]), (4, 2), check_invariants=False)
    assert clip_grad_norm_([], [e.weight], 0.0).item() == pytest.approx(4.0)     # (3+1), not sqrt(9+1)
    calls = []
    n = clip_grad_norm_([], [e.weight], 2.0, table_sq_hook=lambda sq: calls.append(sq.item()) or sq * 4)
    assert calls == [pytest.approx(16.0)] and n.item() == pytest.approx(8.0)
    assert e.weight.grad.to_dense()[1].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)   # 4 * 2/8
    b = nn.Parameter(torch.zeros(3)); b.grad = torch.tensor([0.0, 3.0, 4.0])
    assert clip_grad_norm_([b], [], 0.0, backbone_sq_hook=lambda sq: sq * 4).item() == pytest.approx(10.0)
    # the hooks run even with no gradient at all (collectives stay matched across ranks)
    calls.clear(); (e2,) = tables(sparse=(True,))
    clip_grad_norm_([], [e2.weight], 1.0, backbone_sq_hook=lambda sq: calls.append(("b", sq.item())) or sq,
                    table_sq_hook=lambda sq: calls.append(("t", sq.item())) or sq)
    assert calls == [("b", 0.0), ("t", 0.0)]


def test_compact_rows_sums_duplicates():
    g = torch.sparse_coo_tensor(torch.tensor([[5, 1, 5, 3]]), torch.arange(8.).view(4, 2), (8, 2), check_invariants=False)
    rows, vals = compact_rows(g)
    assert rows.tolist() == [1, 3, 5] and vals.tolist() == [[2., 3.], [6., 7.], [4., 6.]]


def test_schedule_and_config():
    a = OptimArgs(lr=1.0, warmup=10, lr_min_ratio=0.1)
    assert lr_at(0, 100, a) == pytest.approx(0.1) and lr_at(9, 100, a) == pytest.approx(1.0)
    assert lr_at(99, 100, a) == pytest.approx(0.1) and lr_at(54, 100, a) == pytest.approx(0.55)
    assert OptimArgs().table_optimizer == "exact"
    with pytest.raises(ConfigError, match="optim.table_optimizer"): load_config(OptimArgs, overrides=["table_optimizer=x"])
    with pytest.raises(ConfigError, match="optim.schedule"): OptimArgs(schedule="linear")
    with pytest.raises(ConfigError, match="optim.beta1/optim.beta2"): OptimArgs(beta1=0.99, beta2=0.95)
    with pytest.raises(ValueError, match="betas"): table_adamw([nn.Parameter(torch.zeros(2, 2))], betas=(0.99, 0.95))

