"""Building on the meta device (each rank allocates only its table slices and its backbone shard), the per-rank memory
plan against measured peaks, and activation checkpointing. Real processes: torchrun --standalone with gloo on the CPU."""
import json
from pathlib import Path

import pytest, torch

from stem_nb.config import ConfigError
from stem_nb.model import Transformer, ModelArgs, preset, FFN_TYPES, TABLE_INIT_CHUNK
from stem_nb.distributed import (DistributedArgs, StemLayout, apply_activation_checkpointing, build_parallel_model,
                                 materialize_, slice_stem_tables_)
from stem_nb.flops import activation_bytes, alloc_peak, alloc_peaks, count_params, memory_plan

from test_distributed import ROOT, W, torchrun

SCALE = ROOT / "tests" / "dist_scripts" / "scale_worker.py"


def small(ffn="stem", **kw):
    return ModelArgs(**{**dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64,
                               ffn_type=ffn, stem_layers="all", n_experts=3), **kw})


def slice_build(margs, layout, **kw):
    "One rank's model for `layout`, built on meta with its table slices, then materialised on the CPU."
    with torch.device("meta"): m = Transformer(margs)
    return materialize_(slice_stem_tables_(m, layout), layout, "cpu", **kw)


# -- 1. built on meta: the single-process values, bitwise ------------------------------------------------------

@pytest.mark.parametrize("ffn", ["stem", "stem_gate", "stem_add"])
def test_slices_of_P2_and_P4_equal_the_single_process_build(ffn):
    margs = small(ffn)                                           # H = 192: P = 2 and 4 divide it
    single = dict(Transformer(margs).named_parameters())
    for P in (2, 4):
        for s in range(P):
            lay = StemLayout(P, s, P)
            lo, hi = lay.columns(margs.hidden_dim)
            got = dict(slice_build(margs, lay, chunk=500).named_parameters())    # tables drawn in many row blocks
            assert set(got) == set(single)
            for n, want in single.items():
                want = want[:, lo:hi] if n.startswith("stem_tables") else want
                assert got[n].shape == want.shape and torch.equal(got[n], want), (P, s, n)


def test_one_process_build_is_the_plain_model_for_every_variant():
    for ffn in FFN_TYPES:
        margs = small(ffn)
        built, layout = build_parallel_model(margs, DistributedArgs(), "cpu")
        assert layout.world == 1 and type(built) is Transformer
        for (n, a), b in zip(built.state_dict().items(), Transformer(margs).state_dict().values()):
            assert torch.equal(a, b), (ffn, n)


def test_init_distribution_is_unchanged():
    "Tables xavier-normal (std sqrt(2/(V+H))), the rest truncated normal at +-3 sigma (std 0.98658 sigma), w2 with H^-0.5."
    margs = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=8192, multiple_of=128, ffn_type="stem", stem_layers=[1])
    V, d, H = margs.vocab_size, margs.dim, margs.hidden_dim
    lay = StemLayout(4, 1, 4)
    m = slice_build(margs, lay)                                  # a slice: its own columns have the distribution too
    E = m.stem_tables["1"].weight.detach()
    assert E.shape == (V, H // 4)
    assert abs(E.std().item() / (2 / (V + H)) ** 0.5 - 1) < 0.01 and abs(E.mean().item()) < 3e-4
    for w, sigma in ((m.tok_embeddings.weight, d ** -0.5), (m.layers[0].feed_forward.w2.weight, H ** -0.5)):
        w = w.detach()
        assert abs(w.std().item() / (0.98658 * sigma) - 1) < 0.02 and w.abs().max().item() <= 3 * sigma


def test_slice_build_allocates_order_VH_over_P():
    "Building one rank's slice never holds a table: the peak grows by each table's V*H/P, plus one row block in flight."
    margs = ModelArgs(dim=64, n_layers=3, n_heads=4, vocab_size=32000, multiple_of=256, ffn_dim_multiplier=6.0, max_seq_len=64,
                      ffn_type="stem", stem_layers="all")                 # H = 1024: two tables of 131 MB
    V, H, nt = margs.vocab_size, margs.hidden_dim, len(margs.table_layers)
    c = count_params(margs)
    backbone = 4 * (c["total"] - c["stem"])
    peaks = {}
    for P in (2, 4):
        lay = StemLayout(P, P - 1, P)
        _, kept, peak = alloc_peak(lambda: slice_build(margs, lay))
        slices = nt * 4 * V * H // P
        block = 4 * (TABLE_INIT_CHUNK // H) * H                   # one row block of the draw
        param = (4 * 4 + 1) * V * margs.dim                       # the largest backbone value, trunc_normal_'s temporaries and mask
        assert kept >= backbone + slices, (P, kept)
        assert peak <= backbone + slices + max(block, param) + (1 << 20), (P, peak)
        assert peak - backbone - slices < 4 * V * H // 2, (P, peak)     # in flight: less than half a table
        peaks[P] = peak
        print(f"P={P}: peak {peak / 1e6:.1f} MB, of which slices {slices / 1e6:.1f} MB; one full table {4 * V * H / 1e6:.1f} MB")
    assert abs((peaks[2] - peaks[4]) - nt * 4 * V * H // 4) < 0.02 * nt * 4 * V * H // 4


def test_materialize_refuses_what_does_not_fit():
    margs = small()
    with torch.device("meta"): m = Transformer(margs)
    slice_stem_tables_(m, StemLayout(4, 0, 4))
    with pytest.raises(RuntimeError, match=r"stem_tables.1.weight has shape \(300, 48\), neither \[V, H\] = \[300, 192\] nor "
                                           r"this layout's slice \[V, H/P\] = \[300, 96\]"):
        materialize_(m, StemLayout(2, 0, 2), "cpu")
    state = Transformer(margs).state_dict()
    with pytest.raises(KeyError, match="the state dict has no 'output.weight'"):
        materialize_(m, StemLayout(4, 0, 4), "cpu", state={k: v for k, v in state.items() if k != "output.weight"})
    with pytest.raises(RuntimeError, match=r"state\['stem_tables.2.weight'\] has shape \(300, 48\), the model needs \[300, 192\]"):
        materialize_(m, StemLayout(4, 0, 4), "cpu", state={**state, "stem_tables.2.weight": state["stem_tables.2.weight"][:, :48]})
    assert m.tok_embeddings.weight.is_meta                       # refused before anything was allocated


def test_build_refuses_backbone_none_with_several_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="backbone=none with 2 ranks"):
        build_parallel_model(small(), DistributedArgs(backbone="none"), "cpu")


def test_build_runs_prepare_on_meta_before_checkpointing():
    "`prepare` (float8 conversion, say) sees the meta model before checkpointing and wrapping; then everything is allocated."
    seen = {}
    def prepare(m): seen.update(meta=m.tok_embeddings.weight.is_meta, block=type(m.layers[0]).__name__)
    m, _ = build_parallel_model(small(), DistributedArgs(activation_checkpointing="full"), "cpu", prepare=prepare)
    assert seen == {"meta": True, "block": "TransformerBlock"}
    assert type(m.layers[0]).__name__ == "CheckpointedTransformerBlock" and not any(p.is_meta for p in m.parameters())


def test_torchrun_two_ranks_fsdp_build_equals_single_process(tmp_path):
    "2 ranks, gloo, FSDP2 backbone, P = 2: every backbone shard and table slice, and a placed state dict, bitwise."
    torchrun(2, "init", tmp_path, script=SCALE)
    for r in range(2):
        res = json.loads((tmp_path / f"init.rank{r}.json").read_text())
        assert res["mismatch"] == [] and res["dtensors"] > 0, res
        assert res["table_shapes"] == [[256, 96], [256, 96]] and res["cols"] == [96 * r, 96 * (r + 1)]
        assert res["ac_mismatch"] == [] and len(set(res["ac_loss"].values())) == 1, res   # checkpointing: same grads, bitwise


def test_meta_build_resumes_a_checkpoint_of_the_whole_build(tmp_path):
    "Saved at world 2 (built whole, then sharded), resumed at world 4, P = 4, FSDP2, built on meta: the same next losses."
    ref = W.reference()[0][W.STEPS:W.STEPS + 2]
    ck = tmp_path / "ckpt"
    torchrun(2, "save", tmp_path, 2, "ddp", ck)
    out = tmp_path / "w4"; out.mkdir()
    got = torchrun(4, "resume", out, 4, "fsdp", ck, STEM_BUILD="meta")
    torch.testing.assert_close(torch.tensor(got["next_losses"]), torch.tensor(ref), rtol=1e-5, atol=1e-5)


# -- 2. the memory plan against a 4-rank run --------------------------------------------------------------------

def test_memory_plan_matches_the_peak_of_each_of_4_ranks(tmp_path):
    """World 4, stem_parallel_size 4, FSDP2, selective checkpointing: each rank's peak resident memory (VmHWM) over the
    build and two steps is within 15% of the plan plus its idle baseline; above the baseline, within 15% of the plan.
    Large blocks are mmapped (MALLOC_MMAP_THRESHOLD_ fixed at 1 MB) so that freed memory leaves the process: with glibc's
    default, a moving threshold, freed blocks of up to 32 MB stay in the heap and the peak runs 10-25% above the plan."""
    torchrun(4, "memory", tmp_path, script=SCALE, timeout=300, AC_MODE="selective", MALLOC_MMAP_THRESHOLD_="1048576")
    for r in range(4):
        m = json.loads((tmp_path / f"memory.rank{r}.json").read_text())
        assert m["table_shapes"] == [[m["V"], m["H"] // 4]], m["table_shapes"]          # no full table, ever
        total = m["baseline"] + m["plan_peak"]
        assert abs(m["peak"] - total) <= 0.15 * total, m
        assert abs(m["peak"] - m["baseline"] - m["plan_peak"]) <= 0.15 * m["plan_peak"], m
        assert m["build_hwm"] - m["baseline"] < m["full_table_bytes"], m                  # the build held less than one table
        print(f"rank {r}: baseline {m['baseline'] / 1e6:.0f} MB, peak above it {(m['peak'] - m['baseline']) / 1e6:.0f} MB, "
              f"plan {m['plan_peak'] / 1e6:.0f} MB")


def test_memory_plan_parts():
    a = preset("paper-1b", ffn_type="stem", stem_layers="1/3")
    p = memory_plan(a, 1, 4096, world=16, stem_parallel_size=8, precision="bf16", device="cuda", activation_checkpointing="full")
    V, H, nt = a.vocab_size, a.hidden_dim, len(a.table_layers)
    assert p["table_params"] == nt * 4 * V * H // 8 and p["table_optim"] == 2 * p["table_params"]
    assert p["table_bookkeeping"] == nt * (8 * V + 1024 * 40)
    assert p["peak_by_mode"]["none"] > p["peak_by_mode"]["selective"] > p["peak_by_mode"]["full"] == p["peak"]
    ddp = memory_plan(a, 1, 4096, world=16, stem_parallel_size=8, backbone="ddp", precision="autocast", device="cuda")
    c = count_params(a)
    assert ddp["backbone_params"] == 4 * (c["total"] - c["stem"]) == ddp["ddp_buckets"]
    assert ddp["backbone_params"] <= 16 * p["backbone_params"] < 1.01 * ddp["backbone_params"]    # FSDP2: 1/16, padded
    with pytest.raises(ValueError, match="stem_parallel_size=3 does not divide the STEM hidden dim H=8192"):
        memory_plan(a, 1, 4096, world=3, stem_parallel_size=3)


# -- 3. activation checkpointing --------------------------------------------------------------------------------

@pytest.mark.parametrize("ffn", FFN_TYPES)
def test_checkpointing_gradients_equal_bitwise(ffn):
    margs = small(ffn)
    tok = torch.randint(0, 300, (2, 25), generator=torch.Generator().manual_seed(3))
    grads = {}
    for mode in ("none", "selective", "full"):
        m = apply_activation_checkpointing(Transformer(margs), mode)
        loss = m(tok[:, :-1], tok[:, 1:]); loss.backward()
        grads[mode] = (loss.item(), {n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in m.named_parameters()})
    for mode in ("selective", "full"):
        assert grads[mode][0] == grads["none"][0]
        for n, g in grads["none"][1].items(): assert torch.equal(grads[mode][1][n], g), (ffn, mode, n)


def test_checkpointing_can_be_changed_and_refuses_a_bad_mode():
    m = apply_activation_checkpointing(Transformer(small()), "full")
    cls = type(m.layers[0])
    apply_activation_checkpointing(m, "selective"); apply_activation_checkpointing(m, "none")
    assert type(m.layers[0]) is cls and m.layers[0]._ac_mode == "none"      # one subclass, the mode switched
    assert list(m.state_dict()) == list(Transformer(small()).state_dict())   # names unchanged
    with pytest.raises(ConfigError, match="activation_checkpointing: 'all' is not one of"): apply_activation_checkpointing(m, "all")
    with pytest.raises(ConfigError, match="contradicts distributed.activation_checkpointing=full"):
        DistributedArgs(selective_activation_checkpointing=True, activation_checkpointing="full")


def test_checkpointing_saving_measured():
    """A small STEM model (every layer but the first), 2 x 128 tokens, fp32: what the forward keeps (as counted by
    `activation_bytes`), and the peak over forward and backward, per mode; one profiler session for all."""
    a = small(vocab_size=1024, max_seq_len=128)
    tok = torch.randint(0, a.vocab_size, (2, 129), generator=torch.Generator().manual_seed(1))
    modes = ("none", "selective", "full")
    models = {m: apply_activation_checkpointing(Transformer(a), m) for m in modes}
    fwd = lambda m: (lambda: m(tok[:, :-1], tok[:, 1:]))
    def step(m):
        def run(): m.zero_grad(set_to_none=True); m(tok[:, :-1], tok[:, 1:]).backward()
        return run
    runs = alloc_peaks(*[fwd(models[m]) for m in modes], *[step(models[m]) for m in modes])
    kept = {m: runs[i][1] for i, m in enumerate(modes)}
    peak = {m: runs[3 + i][2] for i, m in enumerate(modes)}
    for m in modes:
        counted = activation_bytes(a, 2 * 128, m)["saved"]
        assert abs(kept[m] - counted) <= 0.02 * counted, (m, kept[m], counted)
        print(f"{m:9s}: kept {kept[m] / 1e6:6.1f} MB (counted {counted / 1e6:6.1f}), forward+backward peak {peak[m] / 1e6:6.1f} MB")
    assert kept["full"] < kept["selective"] < kept["none"] and peak["full"] < peak["selective"] < peak["none"]
