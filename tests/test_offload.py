"Offloaded STEM tables: numerically identical to the in-memory model (forward, sparse grads, training), LFU counters."
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import pytest
import torch

from stem_nb.model import ModelArgs, Transformer
from stem_nb.generate import generate_ids
from stem_nb.offload import (LFUCache, OffloadedTables, offload, lfu_hit_rates, lfu_reference, DecodeRecorder,
                             decode_hit_rates, design_summary, lfu_decode_hits, table_design)


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


def test_lfu_decode_hits_by_hand():
    st = [("decode", [t]) for t in (1, 1, 2, 1, 2, 2)]
    assert lfu_decode_hits(st, 10, 1) == dict(capacity=1, hits=2, lookups=6, distinct=2, steps=6)   # a tie keeps 1
    assert lfu_decode_hits([("prefill", [2] * 4)] + st, 10, 1)["hits"] == 3                     # the prompt admits 2
    assert lfu_decode_hits([("prefill", [2] * 4)] + st, 10, 1, warm_prefill=False)["hits"] == 2
    steps = [("decode", list(np.minimum(np.random.default_rng(i).zipf(1.3, 4), 40) - 1)) for i in range(30)]
    assert lfu_decode_hits(steps, 40, 0)["hits"] == 0
    full = lfu_decode_hits(steps, 40, 40)
    assert full["hits"] == full["lookups"] - full["distinct"]
    assert lfu_decode_hits(steps, 40, 5)["hits"] == lfu_reference([ids for _, ids in steps], 40, 5)[0]
    assert [table_design(k) for k in ("0", "ple3", "ve3", "engram3_2_0", "pkm3")] == ["stem", "ple", "value_embed", "engram", "pkm"]
    with pytest.raises(ValueError, match="'moe3'"): table_design("moe3")


def test_decode_hit_rates_on_stem_model():
    m = tiny(4, stem_layers=[1, 3])
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10]]
    plain = generate_ids(m, prompts, 8, batch_size=1)
    df = decode_hit_rates(m, None, prompts, fracs=(0.0, 0.1, 1.0), max_new_tokens=8)
    assert df.attrs["outputs"] == plain and m.__dict__["_stem_lookup"] is None and not m._forward_pre_hooks
    assert df.table.tolist() == ["1"] * 3 + ["3"] * 3 and set(df.design) == {"stem"}
    assert df.capacity.tolist() == [0, 8, 80] * 2 and (df.key_space == 80).all()
    assert (df.steps == 3 * 7).all() and (df.lookups == df.steps).all()             # batch 1: one row a decode step
    with DecodeRecorder(m) as rec: generate_ids(m, prompts, 8, batch_size=1)
    dec = [ids.tolist() for ph, ids in rec.stream("3") if ph == "decode"]
    assert dec == [[o] for out in plain for o in out[:-1]]                             # each new token's row, in order
    assert (df.distinct == len({t for d in dec for t in d})).all()
    h, mi, _ = lfu_reference(dec, 80, 8)
    cold = decode_hit_rates(m, None, prompts, fracs=(0.1,), max_new_tokens=8, warm_prefill=False)
    assert cold.hit_rate.tolist() == [h / (h + mi)] * 2
    assert (df[df.frac == 0].hit_rate == 0).all()
    s = design_summary(df)
    assert s.tables.tolist() == [2] * 3 and s.lookups.tolist() == [42] * 3
    with pytest.raises(ValueError, match=r"fracs must be in \[0, 1\], got \[1.5\]"): decode_hit_rates(m, None, prompts, fracs=(1.5,))
    with pytest.raises(ValueError, match="no tables"): decode_hit_rates(tiny(ffn_type="dense"), None, prompts)


@pytest.mark.parametrize("kind", ["ple", "value_embed", "engram", "pkm"])
def test_decode_hit_rates_on_relatives(kind):
    from stem_nb.relatives import build_model, knobs, ngram_ids, previous_tokens
    m = build_model(ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=80, multiple_of=16, max_seq_len=32,
                              ffn_type=kind, stem_layers=[1, 3], seed=2))
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]                    # one length: generate keeps their order
    plain = generate_ids(m, prompts, 6, batch_size=1)
    df = decode_hit_rates(m, None, prompts, fracs=(0.1, 1.0), max_new_tokens=6)
    assert df.attrs["outputs"] == plain and m.__dict__["_stem_lookup"] is None
    assert df.table.tolist() == [k for k in m.stem_tables for _ in range(2)] and set(df.design) == {kind}
    assert (df.key_space == [m.stem_tables[k].weight.shape[0] for k in df.table]).all() and (df.steps == 2 * 5).all()
    k = knobs(m.args)
    if kind == "pkm": assert ((df.lookups > df.steps) & (df.lookups <= k["heads"] * k["topk"] * df.steps)).all()
    else: assert (df.lookups == df.steps).all()
    with DecodeRecorder(m) as rec: generate_ids(m, prompts, 6, batch_size=1)
    for key in m.stem_tables:
        dec = [ids.tolist() for ph, ids in rec.stream(key) if ph == "decode"]
        r = df[(df.table == key) & (df.frac == 0.1)].iloc[0]
        assert r.distinct == len({t for d in dec for t in d})
        if kind in ("ple", "value_embed"): assert dec == [[o] for out in plain for o in out[:-1]]
        if kind == "engram":                                  # the hashed n-gram of each fed token and the two before it
            n, j = (int(x) for x in key.split("_")[1:])
            want = []
            for p, out in zip(prompts, plain):
                seq = torch.tensor([p + out[:-1]])
                want += [[t] for t in ngram_ids(seq, previous_tokens(seq), n, j, k["buckets"])[0, len(p):].tolist()]
            assert dec == want, key



def test_decode_hit_rates_match_offloaded_tables():
    "Recorded through an installed OffloadedTables (chained), the simulated decode hits are the offload cache's own."
    m = tiny(6)
    prompts = [[1, 2, 3], [4, 5, 6]]
    plain = generate_ids(m, prompts, 10, batch_size=1)
    tab = offload(m, capacity_rows=8)
    df = decode_hit_rates(m, None, prompts, fracs=(0.1,), max_new_tokens=10)
    assert df.attrs["outputs"] == plain and m.__dict__["_stem_lookup"] is tab
    assert tab.steps == 2 + 2 * 9                                          # the recorder passes begin() on
    with DecodeRecorder(tiny(6)) as rec: generate_ids(rec.model, prompts, 10, batch_size=1)
    stream = rec.stream("1")
    second = [i for i, (ph, _) in enumerate(stream) if ph == "prefill"][1]
    steps = [ids.tolist() for _, ids in stream]
    prefill_hits = lfu_reference(steps[:second + 1], 80, 8)[0] - lfu_reference(steps[:second], 80, 8)[0]
    for l, c in tab.caches.items():                                        # the caches started cold with the first prefill
        assert (c.hits, c.misses) == lfu_reference(steps, 80, 8)[:2]
        r = df[df.table == str(l)].iloc[0]
        assert r.capacity == c.capacity and round(r.hit_rate * r.lookups) == c.hits - prefill_hits
        assert r.lookups == c.hits + c.misses - len(set(steps[0])) - len(set(steps[second]))
    tab.remove()
