"Interpretability analyses and knowledge editing: definitions and mechanics on tiny in-memory models."
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest
import torch

from stem_nb.model import ModelArgs, Transformer
from stem_nb.analysis import (angular_spread, upproj_vs_stem_cosine, ff_feature_similarity, ff_features, pairwise_cosines,
                              distinct_positions, edit, edit_mapping, measure_editing, answer_scores, EDIT_STRATEGIES)


def tiny(ffn_type="stem", seed=0, **kw):
    return Transformer(ModelArgs(**{**dict(dim=32, n_layers=3, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=64,
                                           ffn_type=ffn_type, stem_layers="all", seed=seed), **kw}))


class WordTok:
    words = "<bos> <eos> Ann Lee Bob Ray Kim Oslo Rome Lima Paris Jo Max was born in".split()
    bos_id, eos_id, n_vocab = 0, 1, 64
    def encode(self, text, bos=False, eos=False): return [0] * bos + [self.words.index(w) for w in text.split()] + [1] * eos
    def decode(self, ids): return " ".join(self.words[i] for i in ids)


def test_angular_spread_definition():
    m = tiny()
    with torch.no_grad(): m.stem_tables["1"].weight[:4] = torch.eye(4, m.args.hidden_dim)     # 4 orthogonal rows
    out = angular_spread(m, layers=[1], ids=[0, 1, 2, 3])
    cos, p95 = out[1]
    assert torch.allclose(cos, torch.zeros(6)) and p95 == pytest.approx(0.0, abs=1e-6)


def test_fig5_fig6_use_the_model_weights():
    d, s = tiny("dense"), tiny("stem", seed=1)
    tok = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = distinct_positions(tok)
    r5 = upproj_vs_stem_cosine(d, s, tok, layers=[2])
    assert torch.allclose(r5[2]["stem"], pairwise_cosines(s.stem_tables["2"].weight[tok.reshape(-1)[pos]]))
    r6 = ff_feature_similarity(d, s, tok)
    assert set(r6) == {1, 2} and len(r6[1]["dense"]) == len(pos) * (len(pos) - 1) // 2
    # a STEM layer's feature with all-ones rows is the gate alone
    with torch.no_grad(): s.stem_tables["1"].weight.fill_(1.0)
    from stem_nb.analysis import ffn_inputs
    f = ff_features(s, tok, [1])[1]
    u = ffn_inputs(s, tok, [1])[1][pos]
    assert torch.allclose(f, torch.nn.functional.silu(u @ s.layers[1].feed_forward.w1.weight.detach().T))
    with pytest.raises(ValueError, match="give dense_model"): ff_feature_similarity(None, None, tok)


@pytest.mark.parametrize("strategy", EDIT_STRATEGIES)
def test_edit_rows_per_strategy_and_undo(strategy):
    tk, m = WordTok(), tiny()
    E = {k: t.weight.detach().clone() for k, t in m.stem_tables.items()}
    h = edit(m, tk, "Ann Lee", "Jo", strategy)                   # m=2 source tokens, n=1 target token
    for k in m.stem_tables:
        W = m.stem_tables[k].weight.detach()
        assert torch.equal(W[2], E[k][11])
        second = {"pad": torch.zeros_like(E[k][3]), "copy": E[k][11], "subset": E[k][3], "average": E[k][11]}[strategy]
        assert torch.allclose(W[3], second)
        assert torch.equal(W[4:], E[k][4:]) and torch.equal(W[:2], E[k][:2])
    h.undo()
    for k in m.stem_tables: assert torch.equal(m.stem_tables[k].weight.detach(), E[k])
    h = edit(m, tk, "Jo", "Bob Ray Kim", strategy, layers=[2])  # target longer
    want = E["2"][[4, 5, 6]].mean(0) if strategy == "average" else E["2"][4]
    assert torch.allclose(m.stem_tables["2"].weight.detach()[11], want)
    assert torch.equal(m.stem_tables["1"].weight.detach(), E["1"])
    h.undo()


def test_edit_overlapping_entities_use_original_rows():
    tk, m = WordTok(), tiny()
    E = m.stem_tables["1"].weight.detach().clone()
    with edit(m, tk, "Ann Lee", "Lee Ann"):                       # a swap: each row from the original
        assert torch.equal(m.stem_tables["1"].weight.detach()[2], E[3])
        assert torch.equal(m.stem_tables["1"].weight.detach()[3], E[2])
    assert torch.equal(m.stem_tables["1"].weight.detach(), E)


def test_dense_embedding_swap_changes_the_output_like_the_target():
    tk, d = WordTok(), tiny("dense")
    x_src, x_tgt = torch.tensor([[0, 2, 12, 13, 14]]), torch.tensor([[0, 11, 12, 13, 14]])
    with torch.no_grad():
        with edit(d, tk, "Ann", "Jo") as h:
            assert h.info["where"] == "embedding"
            assert torch.equal(d(x_src), d(x_tgt))
        assert not torch.equal(d(x_src), d(x_tgt))


def test_stem_edit_makes_source_prompt_compute_like_target_in_stem_layers():
    "With every layer but 0 STEM, swapping STEM rows changes the FFN modulation only; the attention still sees the source."
    tk, m = WordTok(), tiny()
    x = torch.tensor([[0, 2, 12, 13, 14]])
    with torch.no_grad():
        before = m(x)
        with edit(m, tk, "Ann", "Jo"): after = m(x)
        assert not torch.equal(before, after) and torch.equal(m(x), before)


def test_measure_editing_locality_and_dense_success():
    "Locality is exactly 1 (an edit writes only the source's rows); a dense embedding edit answers A as B was answered."
    people = [dict(name=n, city=c) for n, c in [("Ann", "Oslo"), ("Bob", "Rome"), ("Kim", "Lima"), ("Max", "Paris"), ("Ray", "Oslo")]]
    templates = {"city": "{name} was born in"}
    r = measure_editing(tiny(), WordTok(), (people, templates), n_pairs=2, strategy="average", n_locality=1)
    assert (r["n_pairs"], r["where"], r["locality"], r["n_locality_prompts"]) == (2, "stem", 1.0, 2)   # one other person per pair
    truth = {p["name"]: p["city"] for p in people}
    cities = sorted(set(truth.values()))
    for seed in range(3):
        d = tiny("dense", seed=seed)
        rd = measure_editing(d, WordTok(), (people, templates), n_pairs=2, n_locality=1, seed=seed)
        assert rd["where"] == "embedding" and rd["locality"] == 1.0
        pairs = [(a, b) for a, b in rd["pairs"] if truth[a] != truth[b]]          # prompts with something to move
        answer = {b: cities[int(answer_scores(d, WordTok(), f"{b} was born in", cities).argmax())] for _, b in pairs}
        assert rd["n_edit_prompts"] == len(pairs)
        assert rd["success"] == pytest.approx(sum(answer[b] == truth[b] for _, b in pairs) / len(pairs))
        assert rd["source_kept"] == pytest.approx(sum(answer[b] == truth[a] for a, b in pairs) / len(pairs))
    with pytest.raises(ValueError, match="unknown edit strategy"): edit_mapping(1, 2, "splice")
