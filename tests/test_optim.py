"Optimizers: SparseAdamW vs AdamW, exact lazy decay, untouched rows unwritten, checkpoint roundtrip, global clip."
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import io, math

import pytest, torch
from torch import nn

from stem_nb.config import ConfigError, load_config
from stem_nb.model import Transformer, preset
from stem_nb.optim import (OptimArgs, SparseAdamW, build_optimizers, clip_grad_norm_, grad_sq_norm, lr_at,
                           param_groups, set_lr, bench_optim)

KW = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
LRS = [1e-2, 3e-2, 2e-2, 5e-3, 1e-2, 4e-2, 2e-2, 1e-2]


def tables(V=24, H=6, seed=0, sparse=(True, False)):
    torch.manual_seed(seed); w0 = torch.randn(V, H)
    return [nn.Embedding.from_pretrained(w0.clone(), freeze=False, sparse=s) for s in sparse]


def backward(emb, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    (emb(tokens) * torch.randn(*tokens.shape, emb.weight.shape[1], generator=g)).sum().backward()


def run_pair(batch, dense=False, V=24, H=6, steps=8):
    es, ed = tables(V, H)
    os_, od = SparseAdamW(es.parameters(), lr=1.0, dense=dense, **KW), torch.optim.AdamW(ed.parameters(), lr=1.0, **KW)
    for s in range(steps):
        torch.manual_seed(100 + s); tok = batch(s, V)
        for e, o in ((es, os_), (ed, od)):
            o.param_groups[0]["lr"] = LRS[s]
            o.zero_grad(set_to_none=True); backward(e, tok, s); o.step()
    return es, ed, os_, od


def every_row(s, V):   # all ids, some twice (duplicates must be summed by the coalesce)
    return torch.cat([torch.randperm(V), torch.randint(0, V, (9,))]).view(3, -1)


def test_equals_adamw_when_every_row_touched():
    es, ed, os_, od = run_pair(every_row)
    torch.testing.assert_close(es.weight.data, ed.weight.data, atol=1e-6, rtol=1e-6)
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(os_.state[es.weight][k], od.state[ed.weight][k], atol=1e-6, rtol=1e-6)
    assert os_.state[es.weight]["step"].tolist() == [8] * 24


def test_dense_mode_equals_adamw_with_missing_rows():
    few = lambda s, V: torch.randint(0, V // 2, (5,))
    es, ed, _, _ = run_pair(few, dense=True)
    torch.testing.assert_close(es.weight.data, ed.weight.data, atol=1e-6, rtol=1e-6)


def test_dense_grad_treated_as_all_rows():
    ed1, ed2 = tables(sparse=(False, False))
    o1, o2 = SparseAdamW(ed1.parameters(), lr=1e-2, **KW), torch.optim.AdamW(ed2.parameters(), lr=1e-2, **KW)
    for s in range(4):
        tok = torch.tensor([1, 2, 2])
        for e, o in ((ed1, o1), (ed2, o2)): o.zero_grad(); backward(e, tok, s); o.step()
    torch.testing.assert_close(ed1.weight.data, ed2.weight.data, atol=1e-6, rtol=1e-6)


def test_lazy_decay_is_exact_product_and_untouched_rows_unwritten():
    (es,) = tables(sparse=(True,)); w0 = es.weight.detach().clone().double()
    opt = SparseAdamW(es.parameters(), lr=1.0, **KW)
    snap = None
    for s, lr in enumerate(LRS):
        opt.param_groups[0]["lr"] = lr; opt.zero_grad()
        backward(es, torch.tensor([0, 1] + ([9] if s == 7 else [])), s)
        if s == 7: g9 = es.weight.grad.coalesce().to_dense()[9].double()
        if s == 1: snap = (es.weight.detach().clone(), {k: v.clone() for k, v in opt.state[es.weight].items()})
        opt.step()
    decay = math.prod(1 - lr * 0.1 for lr in LRS)
    torch.testing.assert_close(es.weight.data[9].double(), w0[9] * decay - LRS[-1] * g9 / (g9.abs() + 1e-8),
                               atol=1e-6, rtol=1e-6)
    # row 5 never touched: param and every state row keep their exact bytes from before step 1
    w1, st1 = snap
    st = opt.state[es.weight]
    assert torch.equal(es.weight.data[5], w1[5]) and torch.equal(es.weight.data[5], w0[5].float())
    for k in ("exp_avg", "exp_avg_sq", "step", "decay_at"): assert torch.equal(st[k][5], st1[k][5]), k
    assert st["step"][[0, 9, 5]].tolist() == [8, 1, 0]
    opt.apply_pending_decay_(torch.tensor([5]))
    torch.testing.assert_close(es.weight.data[5].double(), w0[5] * decay, atol=1e-6, rtol=1e-6)


def test_state_dict_roundtrip_weights_only():
    def run(e, o, a, b):
        for s in range(a, b):
            o.zero_grad(); torch.manual_seed(s); backward(e, torch.randint(0, 10, (6,)), s); o.step()
    (e1,) = tables(sparse=(True,)); o1 = SparseAdamW(e1.parameters(), lr=1e-2, **KW); run(e1, o1, 0, 4)
    buf = io.BytesIO(); torch.save({"w": e1.weight.detach(), "opt": o1.state_dict()}, buf); buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    assert set(ck["opt"]["state"][0]) == {"exp_avg", "exp_avg_sq", "step", "decay_at", "decay_log"}
    (e2,) = tables(seed=3, sparse=(True,)); o2 = SparseAdamW(e2.parameters(), lr=5.0, **KW)
    with torch.no_grad(): e2.weight.copy_(ck["w"])
    o2.load_state_dict(ck["opt"])
    assert o2.param_groups[0]["lr"] == 1e-2 and o2.state[e2.weight]["decay_at"].dtype == torch.float64
    run(e1, o1, 4, 7); run(e2, o2, 4, 7)
    assert torch.equal(e1.weight.data, e2.weight.data)
    bad = o1.state_dict(); bad["state"][0] = {**bad["state"][0], "exp_avg": torch.zeros(3, 6)}
    with pytest.raises(ValueError, match="exp_avg"): o2.load_state_dict(bad)


def test_clip_matches_torch_on_densified():
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=64))
    torch.manual_seed(0); x = torch.randint(0, 64, (2, 33))
    m(x[:, :-1], x[:, 1:]).backward()
    ref = []
    for p in m.parameters():
        r = nn.Parameter(torch.zeros_like(p)); r.grad = (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone(); ref.append(r)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 0.05)
    n = clip_grad_norm_(m, m.stem_tables, 0.05)
    assert n > 0.05
    torch.testing.assert_close(n, n_ref, atol=1e-5, rtol=1e-5)
    for p, r in zip(m.parameters(), ref):
        torch.testing.assert_close(p.grad.to_dense() if p.grad.is_sparse else p.grad, r.grad, atol=1e-7, rtol=1e-5)


def test_clip_sums_duplicates_before_squaring_and_hook():
    (e,) = tables(V=4, H=2, sparse=(True,))
    e.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.tensor([[3.0, 0.0], [1.0, 0.0]]), (4, 2))
    assert clip_grad_norm_([], {"0": e}, 0.0).item() == pytest.approx(4.0)     # (3+1), not sqrt(9+1)
    calls = []
    n = clip_grad_norm_([], {"0": e}, 2.0, table_sq_hook=lambda sq: calls.append(sq.item()) or sq * 4)
    assert calls == [pytest.approx(16.0)] and n.item() == pytest.approx(8.0)
    assert e.weight.grad.to_dense()[1].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)   # 4 * 2/8
    # the hook runs even with no gradient at all (collectives stay matched across ranks)
    calls.clear(); (e2,) = tables(sparse=(True,))
    clip_grad_norm_([], [e2], 1.0, table_sq_hook=lambda sq: calls.append(sq.item()) or sq)
    assert calls == [0.0]


def test_param_groups_and_build():
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=64))
    names = {id(p): n for n, p in m.named_parameters()}
    g = {x["name"]: [names[id(p)] for p in x["params"]] for x in param_groups(m)}
    assert "tok_embeddings.weight" in g["decay"] and "output.weight" in g["decay"]
    assert all(p.endswith("norm.weight") for p in g["no_decay"])
    assert not any(n.startswith("stem_tables") for n in g["decay"] + g["no_decay"])
    args = OptimArgs(lr=1e-3, table_lr=2e-3, warmup=10, table_optimizer="dense")
    bb, tb = build_optimizers(m, m.stem_tables, args)
    assert all(x["dense"] for x in tb.param_groups) and len(tb.param_groups) == len(m.stem_tables)
    assert set_lr([bb, tb], 4, 100, args) == pytest.approx(5e-4)
    assert [x["lr"] for x in tb.param_groups] == pytest.approx([1e-3] * len(m.stem_tables))
    with pytest.raises(ValueError, match="stem_tables"):
        build_optimizers(list(m.named_parameters()), m.stem_tables, args)


def test_schedule_and_config():
    a = OptimArgs(lr=1.0, warmup=10, lr_min_ratio=0.1)
    assert lr_at(0, 100, a) == pytest.approx(0.1) and lr_at(9, 100, a) == pytest.approx(1.0)
    assert lr_at(99, 100, a) == pytest.approx(0.1) and lr_at(54, 100, a) == pytest.approx(0.55)
    with pytest.raises(ConfigError, match="optim.table_optimizer"): load_config(OptimArgs, overrides=["table_optimizer=x"])
    with pytest.raises(ConfigError, match="optim.schedule"): OptimArgs(schedule="linear")


def test_bench_tiny():
    r = bench_optim(V=5000, H=16, n_tokens=256, repeats=2)
    assert r["bench"] == "optim_sparse_vs_dense" and r["unique_rows"] <= 256
    assert r["sparse_bytes_touched"] < r["dense_bytes_touched"] and r["speedup"] > 0
