"""`export-hf` / `import-hf` (stem_nb.hf) as a user runs them: train the debug config from the command line, score it with
`stem-nb eval`, export it with `python -m stem_nb.hf export-hf`, then open the folder with transformers in a Python that
cannot import stem_nb (logits within 1e-5 in fp32, greedy `generate()` with the KV cache = `stem_nb.generate`'s tokens,
`AutoTokenizer` = the run's tokenizer), with lm-eval's `hf` model (= `StemLM` per request), and back with `import_hf`
(the same state dict, bit for bit). Dense, STEM-gate, STEM-dagger and Hash-MoE models are exported and checked the same
way. Tampered folders and refused commands: the message names the file, the exit code is 2, nothing written changes."""
import os
os.environ.setdefault("HF_DATASETS_OFFLINE", "1"); os.environ.setdefault("HF_HUB_OFFLINE", "1")
import dataclasses, json, math, shutil, subprocess, sys
from pathlib import Path

import pytest, torch, yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stem_nb.checkpoint import save_checkpoint
from stem_nb.restore import export_consolidated, load_model, resolve_checkpoint
from stem_nb.data import load_tokenizer
from stem_nb.corpora import shakespeare
from stem_nb.synthetic import make_bios
from stem_nb.lm import StemLM, run_tokenizer
from stem_nb.generate import generate_ids
from stem_nb.hf import (CONFIG_FILE, INDEX, PROBES, WEIGHTS, HFError, export_cli, export_hf, import_cli, import_hf,
                        read_header)
from stem_nb.hf_modeling import modeling_source
from stem_nb.model import Transformer, preset
from stem_nb.tasks import build_offline_tasks, task_manager
from test_eval import FACTS, VERSE
from test_faults_train import CONFIG, ENV, ROOT, digest

HF = [sys.executable, "-m", "stem_nb.hf"]
DEBUG = yaml.safe_load(CONFIG.read_text())["model"]            # the debug config's model: the variants share its shape
VARIANTS = {"dense": {}, "stem_gate": {"n_kv_heads": 2}, "stem_add": {"stem_layers": "1/3"}, "hash_moe": {"n_experts": 3}}
MAX_NEW = 16


def cli(*args, cwd=ROOT, timeout=600):
    return subprocess.run([*HF, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bpe4096")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    build_offline_tasks(d, facts=FACTS, text=VERSE, n_docs=12)
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory, tasks_dir):
    "The debug config trained 4 steps from the command line, scored by `stem-nb eval` on two documents."
    d = tmp_path_factory.mktemp("train") / "run"
    r = subprocess.run([sys.executable, "-m", "stem_nb.train", str(CONFIG), f"dump_dir={d}", "steps=4", "eval_every=0",
                        "checkpoint.every=0", "progress=lines"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    from stem_nb.eval import cli as eval_cli
    assert eval_cli([str(d), "--tasks", "stem_bios_mc", "--limit", "2", "--task-dir", str(tasks_dir)]) == 0
    return d


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    "`python -m stem_nb.hf export-hf RUN OUT`, as a user runs it."
    out = tmp_path_factory.mktemp("export") / "hf"
    r = cli("export-hf", run, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"wrote {out}")
    return out


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    "{ffn_type: (model, folder)}: a model of each other variant (weights perturbed), saved as a checkpoint and exported."
    root, out = tmp_path_factory.mktemp("variants"), {}
    for i, (ffn, kw) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        m = Transformer(preset("debug", **{**DEBUG, "ffn_type": ffn, **kw})).eval()
        with torch.no_grad():
            for p in m.parameters(): p.add_(0.05 * torch.randn_like(p))          # norms away from 1: every weight counts
        save_checkpoint(root / ffn / "checkpoints", 3, m, config_yaml="data:\n  tokenizer: bpe4096\n")
        out[ffn] = (m, export_hf(root / ffn, root / f"{ffn}-hf"))
    return out


CHILD = r'''
import sys
sys.modules["stem_nb"] = None                        # this Python cannot import stem_nb
import json, os
import torch, transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
spec = json.load(open(sys.argv[1]))
try:
    import stem_nb
    blocked = False
except ImportError: blocked = True
res = dict(blocked=blocked, cwd=os.getcwd(), transformers=transformers.__version__, folders={})
ids, prompts = torch.tensor(spec["ids"]), torch.tensor(spec["prompts"])
for name, folder in spec["folders"].items():
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)   # (it loads config.json, whose class is the folder's)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad(): save_file({"logits": model(ids).logits.contiguous()}, os.path.join(spec["out"], name + ".safetensors"))
    g = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=spec["max_new"], do_sample=False)
    res["folders"][name] = dict(module=type(model).__module__, dtype=str(model.dtype), generated=g[:, prompts.shape[1]:].tolist(),
                                encoded=[tok(t).input_ids for t in spec["texts"]],
                                plain=[tok.encode(t, add_special_tokens=False) for t in spec["texts"]],
                                decoded=[tok.decode(tok.encode(t, add_special_tokens=False)) for t in spec["texts"]])
res["stem_nb_loaded"] = sys.modules.get("stem_nb") is not None
print(json.dumps(res))
'''


def texts():
    "Probe strings, held-out-like Shakespeare and bios documents: what the tokenizer check encodes."
    return list(PROBES) + [w["text"][:400] for w in shakespeare()[:3]] + make_bios(n_people=5)["docs"][:3]


def inputs(tok):
    "(ids (2, 64) for the logits, equal-length prompts (2, 8) for generation) from real text."
    a = tok.encode(shakespeare()[0]["text"], bos=True)[:64]
    b = tok.encode(make_bios(n_people=5)["docs"][0] * 4, bos=True)[:64]
    assert len(a) == len(b) == 64
    return [a, b], [a[:8], b[:8]]


@pytest.fixture(scope="module")
def child(exported, variants, tok, tmp_path_factory):
    "Every folder opened by transformers in a Python without stem_nb, working in a folder outside the repository."
    work = tmp_path_factory.mktemp("nostem")
    ids, prompts = inputs(tok)
    folders = {"stem": str(exported), **{k: str(f) for k, (_, f) in variants.items()}}
    (work / "spec.json").write_text(json.dumps(dict(folders=folders, ids=ids, prompts=prompts, texts=texts(),
                                                    max_new=MAX_NEW, out=str(work))))
    (work / "child.py").write_text(CHILD)
    env = {**ENV, "HF_MODULES_CACHE": str(work / "modules")}
    r = subprocess.run([sys.executable, str(work / "child.py"), str(work / "spec.json")], capture_output=True, text=True,
                       env=env, cwd=work, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["logits"] = {k: load_file(str(work / f"{k}.safetensors"))["logits"] for k in folders}
    return res


def models(run, variants):
    return {"stem": load_model(run).eval(), **{k: m for k, (m, _) in variants.items()}}


def test_folder_contents_and_card(exported, run):
    names = {p.name for p in exported.iterdir()}
    assert {CONFIG_FILE, WEIGHTS, "modeling_stem.py", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md"} == names
    cfg = json.loads((exported / CONFIG_FILE).read_text())
    assert cfg["auto_map"] == {"AutoConfig": "modeling_stem.StemConfig", "AutoModelForCausalLM": "modeling_stem.StemForCausalLM"}
    assert (cfg["ffn_type"], cfg["stem_layers"], cfg["intermediate_size"], cfg["vocab_size"]) == ("stem", [1, 2], 192, 4096)
    assert cfg["stem_nb"]["tokenizer"]["name"] == "bpe4096" and cfg["stem_nb"]["step"] == 4
    tables = {k: v["shape"] for k, v in read_header(exported / WEIGHTS).items() if ".stem_tables." in k}
    assert tables == {"model.stem_tables.1.weight": [4096, 192], "model.stem_tables.2.weight": [4096, 192]}
    with safe_open(str(exported / WEIGHTS), framework="pt") as sf:          # one layer's rows, without reading the rest
        rows = sf.get_slice("model.stem_tables.2.weight")[100:103]
    assert torch.equal(rows, load_model(run).stem_tables["2"].weight[100:103].detach())
    assert (exported / "modeling_stem.py").read_text() == modeling_source() and "stem_nb" not in modeling_source()
    card = (exported / "README.md").read_text()
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    val = [r for r in metrics if "val_loss" in r][-1]
    res = json.loads((run / "eval_results.json").read_text())
    assert res["checkpoint"] == str(resolve_checkpoint(run).resolve())
    acc = res["results"]["stem_bios_mc"]["acc,none"]
    assert "- checkpoint: step 4 of 4" in card and "- tokens trained: 1,024" in card
    assert f"- validation loss: {val['val_loss']:.4f} (step {val['step']})" in card and val["step"] == 4
    assert f"| stem_bios_mc | acc | none | {acc:.4f} |" in card and "ffn_type: stem" in card and "steps: 4" in card
    assert "STEM (Scaling Transformers with Embedding Modules) replaces the up-projection" in card


@pytest.mark.parametrize("name", ["stem", *VARIANTS])
def test_transformers_without_stem_nb_gives_stem_nb_logits(child, run, variants, tok, name):
    assert child["blocked"] and not child["stem_nb_loaded"] and not Path(child["cwd"]).resolve().is_relative_to(ROOT)
    got = child["folders"][name]
    assert got["module"].startswith("transformers_modules") and got["module"].endswith("modeling_stem"), got["module"]
    assert got["dtype"] == "torch.float32"
    ids, _ = inputs(tok)
    with torch.no_grad(): ref = models(run, variants)[name](torch.tensor(ids))
    diff = (child["logits"][name] - ref).abs().max().item()
    assert diff <= 1e-5, f"{name}: max |logit difference| {diff:.3g}"


@pytest.mark.parametrize("name", ["stem", *VARIANTS])
def test_greedy_generate_with_cache_equals_stem_nb(child, run, variants, tok, name):
    _, prompts = inputs(tok)
    want = generate_ids(models(run, variants)[name], prompts, MAX_NEW, eos_id=tok.eos_id)
    cut = lambda row: row[:row.index(tok.eos_id) + 1] if tok.eos_id in row else row        # HF pads a finished row
    assert [cut(r) for r in child["folders"][name]["generated"]] == want
    assert all(len(w) == MAX_NEW or w[-1] == tok.eos_id for w in want)


def test_autotokenizer_encodes_like_the_run(child, tok):
    got, ts = child["folders"]["stem"], texts()
    assert got["encoded"] == [tok.encode(t, bos=True) for t in ts]
    assert got["plain"] == [tok.encode(t) for t in ts]
    assert got["decoded"] == [tok.decode(tok.encode(t)) for t in ts]
    assert tok.encode("<|end_of_text|>") != [tok.eos_id]                 # special-token text is plain text in both


def test_lm_eval_hf_equals_stemlm(exported, run, tok, tasks_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import get_task_dict
    tasks = get_task_dict(["stem_bios_mc", "stem_shakespeare_next", "stem_heldout_ppl"], task_manager(tasks_dir))
    reqs = []
    for name in ("stem_bios_mc", "stem_shakespeare_next"):
        t = tasks[name]
        for d in list(t.eval_docs)[:3]:
            reqs += [(t.doc_to_text(d), t.config.target_delimiter + c) for c in t.doc_to_choice(d)]
    inst = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    lm = StemLM(load_model(run), tok, batch_size=4)
    ours = lm.loglikelihood(reqs)
    hf = HFLM(pretrained=str(exported), trust_remote_code=True, batch_size=4, device="cpu")
    assert hf.max_length == 64 and hf.prefix_token_id == tok.bos_id
    theirs = hf.loglikelihood(inst, disable_tqdm=True)
    # both prepend BOS and split (context, continuation) alike, except where the context's last token merges with the
    # continuation's first (".\n" is one token): lm-eval then cuts the whole string's ids at the context's length,
    # StemLM tokenizes the two apart. Same split: the same numbers; StemLM's split given to lm-eval: the same numbers.
    pairs = [lm._encode_pair(c, x) for c, x in reqs]
    same = [i for i, (c, x) in enumerate(reqs) if hf._encode_pair(c, x) == pairs[i]]
    assert len(reqs) >= 12 and len(same) >= 6
    assert [theirs[i][0] for i in same] == pytest.approx([ours[i][0] for i in same], abs=1e-4)
    assert [theirs[i][1] for i in same] == [ours[i][1] for i in same]
    given = hf._loglikelihood_tokens([(r, a, b) for r, (a, b) in zip(reqs, pairs)], disable_tqdm=True)
    assert [x[0] for x in given] == pytest.approx([x[0] for x in ours], abs=1e-4)
    assert [x[1] for x in given] == [x[1] for x in ours]
    # perplexity documents (rolling windows): lm-eval's hf model adds BOS through the tokenizer unless told not to
    ppl = tasks["stem_heldout_ppl"]
    docs = [ppl.doc_to_target(d) for d in list(ppl.eval_docs)[:3]]
    roll = HFLM(pretrained=str(exported), trust_remote_code=True, batch_size=4, device="cpu", add_bos_token=False)
    got = roll.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(docs)], disable_tqdm=True)
    assert got == pytest.approx(StemLM(load_model(run), tok).loglikelihood_rolling([(t,) for t in docs]), abs=1e-3)


def test_round_trip(exported, run, tmp_path, tok):
    m, back = load_model(run), import_hf(exported)
    assert dataclasses.asdict(back.args) == dataclasses.asdict(m.args)
    assert list(back.state_dict()) == list(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values()))
    assert import_cli([str(exported), str(tmp_path / "imported")]) == 0            # `stem-nb import-hf DIR OUT`
    again = load_model(tmp_path / "imported")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))
    assert run_tokenizer(tmp_path / "imported").fingerprint == tok.fingerprint   # `stem-nb eval OUT` scores with the run's


def test_variants_round_trip_and_sharding(variants, tmp_path):
    for ffn, (m, folder) in variants.items():
        back = import_hf(folder)
        assert back.args.ffn_type == ffn and back.args.replaced_layers == m.args.replaced_layers
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), m.state_dict().values())), ffn
    m, _ = variants["hash_moe"]
    ck = save_checkpoint(tmp_path / "moe" / "checkpoints", 1, m, config_yaml="data:\n  tokenizer: bpe4096\n")
    out = export_hf(ck, tmp_path / "sharded", max_shard_bytes=2_000_000)
    wm = json.loads((out / INDEX).read_text())["weight_map"]
    assert len(set(wm.values())) >= 2 and not (out / WEIGHTS).exists()
    assert all(torch.equal(a, b) for a, b in zip(import_hf(out).state_dict().values(), m.state_dict().values()))


def test_consolidated_pt_with_tokenizer(run, tmp_path):
    pt = export_consolidated(resolve_checkpoint(run), tmp_path / "model.pt")
    assert export_cli([str(pt), str(tmp_path / "a")]) == 2                     # a bare .pt records no tokenizer
    assert not (tmp_path / "a").exists()
    assert export_cli([str(pt), str(tmp_path / "b"), "--tokenizer", "bpe4096"]) == 0
    assert all(torch.equal(a, b) for a, b in zip(import_hf(tmp_path / "b").state_dict().values(), load_model(run).state_dict().values()))
    card = (tmp_path / "b" / "README.md").read_text()
    assert "- tokens trained: not recorded" in card and "- validation loss: not recorded" in card


def _tables_shape(d):
    cfg = json.loads((d / CONFIG_FILE).read_text()); cfg["intermediate_size"] = 256; cfg["stem_nb"]["multiple_of"] = 128
    (d / CONFIG_FILE).write_text(json.dumps(cfg))


def _resave(fn):
    def edit(d):
        t = load_file(str(d / WEIGHTS)); fn(t); save_file(t, str(d / WEIGHTS), metadata={"format": "pt"})
    return edit


def _bad_index(d):
    t = load_file(str(d / WEIGHTS)); (d / WEIGHTS).unlink()
    save_file(t, str(d / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    (d / INDEX).write_text(json.dumps({"weight_map": {k: "../model-00001-of-00001.safetensors" for k in t}}))


def _huge_header(d):
    raw = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes((2**62).to_bytes(8, "little") + raw[8:])


TAMPER = {
    "table width in config": (_tables_shape, f"{WEIGHTS}: tensor model.layers.0.feed_forward.w1.weight has shape [192, 64]"),
    "NaN in a table": (_resave(lambda t: t["model.stem_tables.2.weight"].__setitem__((7, 7), float("inf"))),
                       f"{WEIGHTS}: tensor model.stem_tables.2.weight holds NaN or inf"),
    "table removed": (_resave(lambda t: t.pop("model.stem_tables.1.weight")), f"{WEIGHTS}: no tensor model.stem_tables.1.weight"),
    "table transposed": (_resave(lambda t: t.update({"model.stem_tables.1.weight": t["model.stem_tables.1.weight"].T.contiguous()})),
                         f"{WEIGHTS}: tensor model.stem_tables.1.weight has shape [192, 4096]"),
    "index outside the folder": (_bad_index, f"{INDEX}: tensor "),
    "header length": (_huge_header, f"{WEIGHTS} is refused: its safetensors header length is {2**62:,} bytes, more than the limit"),
    "pickle only": (lambda d: (d / WEIGHTS).rename(d / "pytorch_model.bin"), "no safetensors weights to read"),
    "config not JSON": (lambda d: (d / CONFIG_FILE).write_text("{'vocab_size': 4096"), f"{CONFIG_FILE} is not valid JSON"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_import_hf_refuses_a_tampered_folder(exported, tmp_path, case):
    edit, msg = TAMPER[case]
    d = tmp_path / "hf"; shutil.copytree(exported, d); edit(d)
    with pytest.raises(HFError) as e: import_hf(d)
    assert msg in str(e.value), str(e.value)


def test_import_hf_cli_refuses_and_writes_nothing(exported, tmp_path):
    d = tmp_path / "hf"; shutil.copytree(exported, d); _resave(lambda t: t["lm_head.weight"].__setitem__((0, 0), float("nan")))(d)
    before = digest(d)
    r = cli("import-hf", d, tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"stem-nb import-hf: error: {d / WEIGHTS}: tensor lm_head.weight holds NaN or inf values"
    assert not (tmp_path / "out").exists() and digest(d) == before


def test_export_hf_cli_refuses_to_overwrite(run, exported, tmp_path):
    out = tmp_path / "hf"; shutil.copytree(exported, out); (out / "notes.txt").write_text("mine")
    before, run_before = digest(out), digest(run)
    r = cli("export-hf", run, out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{out} exists and is not empty: pass --force to replace it" in r.stderr
    assert digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]   # no temporary folder left
    assert export_cli([str(run), str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and digest(out) == digest(exported) and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert export_cli([str(run / "checkpoints"), str(run), "--force"]) == 2                  # never over the run itself
    assert digest(run) == run_before


def test_sentencepiece_run_is_refused_clearly(tmp_path, capsys):
    from test_data import _train_sentencepiece
    sp = _train_sentencepiece(tmp_path / "tokenizer.model")
    m = Transformer(preset("debug", vocab_size=512))
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, m, config_yaml=f"data:\n  tokenizer: {sp}\n")
    assert export_cli([str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert "is a SentencePiece model: export-hf writes tiktoken-style BPE" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
