"Generation: KV-cache decode equals full recompute; sampling, stop strings, STEM rows of generated tokens."
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest, torch

from stem_nb.generate import generate, generate_ids, sample_next
from stem_nb.model import Transformer, preset
from stem_nb.tokenizer import get_tokenizer




@pytest.fixture(scope="module", params=["dense", "stem"])
def model(request):
    torch.manual_seed(0)
    return Transformer(preset("debug", ffn_type=request.param, stem_layers="all", vocab_size=258, n_kv_heads=2)).eval()


def test_greedy_kv_cache_equals_no_cache(model):
    prompts = [[256] + list(b"To be, or not to be"), [256, 65], [256] + list(b"abcdefghijklmnopqrs")]  # two of equal length
    a = generate_ids(model, prompts, 32, use_cache=True, batch_size=2)
    b = generate_ids(model, prompts, 32, use_cache=False)
    assert a == b and all(len(x) == 32 for x in a)


def test_long_prompt_keeps_its_tail(model):
    L = model.args.max_seq_len
    p = list(range(L + 50))
    p = [t % 256 for t in p]
    assert generate_ids(model, [p], 8) == generate_ids(model, [p[-(L - 8):]], 8)


def test_sampling_is_seeded_and_top_p_restricts():
    lg = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(lg, 1.0, 0.5, g).item() for _ in range(50)} == {1}
    assert {sample_next(lg, 1.0, 1.0, g).item() for _ in range(500)} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"): sample_next(lg, 1.0, 0.0)


def test_sampled_generation_reproducible(model):
    ids = [[256] + list(b"hello")]
    s = generate_ids(model, ids, 16, temperature=0.8, top_p=0.95, seed=7)
    assert s == generate_ids(model, ids, 16, temperature=0.8, top_p=0.95, seed=7)
    assert s != generate_ids(model, ids, 16, temperature=0.8, top_p=0.95, seed=8)


def test_stop_strings_and_eos(model):
    tok = get_tokenizer("byte")
    full = generate(model, tok, "Once upon a time", 24)
    stop = full[4:6]
    assert generate(model, tok, "Once upon a time", 24, stop=stop) == full[:full.index(stop)]
    assert generate(model, tok, ["Once upon a time", "x"], 5) == [generate(model, tok, "Once upon a time", 5), generate(model, tok, "x", 5)]
    # EOS ends a row: make the head always prefer EOS
    def eos_first(mod, inp, out):
        out = out.clone(); out[..., 257] = out.abs().max() + 10; return out
    h = model.output.register_forward_hook(eos_first)
    try: out = generate_ids(model, [[256, 65]], 10, eos_id=257)
    finally: h.remove()
    assert out == [[257]]


def test_each_new_token_reads_its_stem_row():
    torch.manual_seed(0)
    m = Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=258)).eval()
    seen = []
    def lookup(layer, t):
        seen.append((layer, t.flatten().tolist()))
        return m.stem_tables[str(layer)](t)
    m.set_stem_lookup(lookup)
    p = [256] + list(b"abc")
    out = generate_ids(m, [p], 5)[0]
    m.set_stem_lookup(None)
    n = len(m.args.table_layers)
    assert [s[1] for s in seen[:n]] == [p] * n
    assert [s[1] for s in seen[n::n]] == [[t] for t in out[:-1]]
    assert sorted({s[0] for s in seen}) == m.args.table_layers


def test_prefill_logits_only_at_the_last_position_change_nothing(model):
    from stem_nb.generate import output_at
    x = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(1))
    full = model(x)
    with output_at(model, lambda h: h[:, -1]): last = model(x)
    assert last.shape == (3, model.args.vocab_size) and torch.allclose(last, full[:, -1], atol=1e-5)
    assert model(x).shape == full.shape                       # the hook is removed
