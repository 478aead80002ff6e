"Offloaded STEM tables: numerically identical to the in-memory model (forward, sparse grads, training), LFU counters."
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import pytest
import torch

from stem_nb.model import ModelArgs, Transformer
from stem_nb.offload import LFUCache, OffloadedTables, offload, lfu_hit_rates, lfu_reference


def tiny(seed=0, **kw):
    return Transformer(ModelArgs(**{**dict(dim=32, n_layers=4, n_heads=4, vocab_size=80, multiple_of=16, max_seq_len=32,
                                           ffn_type="stem", stem_layers="all", seed=seed), **kw}))


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("cap", [0, 5, 80])
def test_forward_and_sparse_grads_identical(prefetch, cap):
    x = torch.randint(0, 80, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    ref, m = tiny(), tiny()
    lr = ref(x, y); lr.backward()
    tab = offload(m, capacity_rows=cap, prefetch=prefetch)
    for _ in range(2):
        m.zero_grad(set_to_none=True); l = m(x, y); l.backward()
    assert torch.equal(l, lr)
    assert torch.equal(m(x), ref(x))
    for k in ref.stem_tables:
        g, gr = m.stem_tables[k].weight.grad, ref.stem_tables[k].weight.grad
        assert g.is_sparse and gr.is_sparse
        assert g.is_coalesced() and gr.is_coalesced()                                             # compact: one row per id
        assert torch.equal(g.indices(), gr.indices()) and torch.equal(g.values(), gr.values())
    for k, p in ref.named_parameters():
        if not k.startswith("stem_tables") and p.grad is not None:
            assert torch.equal(dict(m.named_parameters())[k].grad, p.grad), k
    s = tab.stats()
    # 3 steps (two training forwards, one inference) over the same 30 unique ids, in each of the 3 STEM layers
    assert (len(tab.layers), len(torch.unique(x)), s["tokens"], s["unique_rows"]) == (3, 30, 96, 90)
    h, mi, cached = lfu_reference([x.reshape(-1).tolist()] * 3, 80, cap)
    assert (s["hits"], s["misses"]) == (3 * h, 3 * mi)
    assert (s["hits"], s["misses"]) == {0: (0, 270), 5: (30, 240), 80: (180, 90)}[cap]   # full cache: only step 1 misses
    for c in tab.caches.values(): assert c.cached_ids().tolist() == cached
    if cap == 0: assert s["bytes_per_token"] == s["bytes_per_token_dedup_only"]
    tab.remove()


def test_training_with_cache_refresh_matches_in_memory():
    x = torch.randint(0, 80, (2, 16), generator=torch.Generator().manual_seed(2))
    ref, m = tiny(3), tiny(3)
    tab = offload(m, cache_frac=0.25)
    for model in (ref, m):
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        for step in range(4):
            xb = torch.roll(x, step, 1)
            opt.zero_grad(); model(xb, torch.roll(xb, -1, 1)).backward(); opt.step()
            if model is m: tab.refresh()
    for k, p in ref.state_dict().items(): assert torch.equal(m.state_dict()[k], p), k
    tab.remove()


def test_stale_cache_without_refresh_is_detectable():
    "Documents why refresh() exists: after an update, a cached row is stale until refreshed."
    m = tiny()
    tab = offload(m, cache_frac=1.0)
    x = torch.tensor([[3, 4, 5]])
    with torch.no_grad(): m(x)
    with torch.no_grad(): m.stem_tables["1"].weight[3] += 1.0
    with torch.no_grad(): stale = tab(1, x)
    assert not torch.equal(stale[0, 0], m.stem_tables["1"].weight[3])
    tab.refresh(torch.tensor([3]))
    with torch.no_grad(): assert torch.equal(tab(1, x)[0, 0], m.stem_tables["1"].weight[3])
    tab.remove()


def test_byte_budget_and_counters():
    m = tiny()
    H = m.args.hidden_dim
    tab = offload(m, byte_budget=3 * 10 * H * 4)                  # 3 layers x 10 rows of fp32
    assert all(c.capacity == 10 for c in tab.caches.values())
    x = torch.tensor([[1, 2, 2, 3]])
    with torch.no_grad(): m(x); m(x)
    s = tab.stats()
    assert s["tokens"] == 8 and s["unique_rows"] == 6
    assert s["misses"] == 3 * 3 and s["hits"] == 3 * 3            # cold misses, then all hits, per layer
    assert s["bytes_moved"] == 9 * H * 4
    assert s["device_cache_bytes"] == 3 * 10 * H * 4
    tab.remove()
    with pytest.raises(ValueError, match="at most one"): OffloadedTables(m, capacity_rows=1, byte_budget=10)
    with pytest.raises(ValueError, match="no STEM tables"): offload(tiny(ffn_type="dense"))
    with pytest.raises(KeyError, match="layer 0 has no STEM table"): offload(m)(0, x)


def test_lfu_keeps_frequent_rows_and_hit_curve_is_monotone():
    host = torch.randn(50, 4)
    c = LFUCache(50, 4, capacity_rows=3)
    for ids in [[1, 2, 3]] * 3 + [[9], [10], [11]]:
        assert torch.equal(c.fetch(torch.tensor(ids), host), host[ids])
    assert c.cached_ids().tolist() == [1, 2, 3]
    toks = np.minimum(np.random.default_rng(0).zipf(1.3, 5000), 500) - 1
    r = lfu_hit_rates(toks, 500, fracs=(0.01, 0.05, 0.2), max_eval_tokens=400)
    rates = [x["hit_rate"] for x in r]
    assert rates == sorted(rates)
    rp = lfu_hit_rates(toks, 500, fracs=(0.05,), mode="prefill", batch=2, seq=16, warm=False)
    held = toks[int(len(toks) * 0.9):]
    chunks = [list(held[i:i + 32]) for i in range(0, len(held) - 31, 32)]
    hits, misses, _ = lfu_reference(chunks, 500, 25)                       # the plain-Python LFU, same steps
    assert rp[0]["mode"] == "prefill" and rp[0]["rows_requested"] == hits + misses
    assert rp[0]["hit_rate"] == pytest.approx(hits / (hits + misses), abs=1e-12)
    with pytest.raises(ValueError, match="mode"): lfu_hit_rates(toks, 500, mode="train")
