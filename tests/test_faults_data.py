"""Data faults from the command line, as a user meets them: one clear message, exit code 2, nothing
lost. Among them: a token cache holding ids past the vocabulary, and bios options the corpus cannot make."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest

from test_faults_train import digest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "debug.yaml"


def _train(tmp_path: Path, *overrides: str, config=CONFIG, env=None) -> tuple[subprocess.CompletedProcess, dict, dict]:
    "Run `python -m stem_nb.train CONFIG OVERRIDES dump_dir=...` on a dump dir holding an earlier run's file; (result, sha256s before, after)."
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "metrics.jsonl").write_text('{"step": 10, "loss": 3.2}\n')          # written before: must survive
    before = digest(dump, skip=())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "STEM_NB_DATA": str(tmp_path / "data"), **(env or {})}
    r = subprocess.run([sys.executable, "-m", "stem_nb.train", str(config), *overrides, f"dump_dir={dump}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    return r, before, digest(dump, skip=())


def _check(r, before, after, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("stem-nb train:")]
    assert len(lines) == 1, r.stderr[-2000:]                                    # one message
    for n in needles: assert n in lines[0], (n, lines[0])
    assert {k: v for k, v in after.items() if k in before} == before            # nothing written before is changed
    assert not any(k.startswith("checkpoints") for k in after)


@pytest.mark.parametrize("override", ["data.sources.nope=1.0", "data.sources={nope: 1.0}"])
def test_unknown_source(tmp_path, override):
    r, before, after = _train(tmp_path, override)
    _check(r, before, after, "DataError: unknown data source 'nope' in data.sources", "embedded corpus (shakespeare",
           "stem-nb prepare SOURCE OUT_DIR")


def test_hub_source_not_prepared(tmp_path):
    r, before, after = _train(tmp_path, "data.sources.fineweb_edu=1.0")
    q = tmp_path / "data" / "fineweb_edu"
    _check(r, before, after, "hub source 'fineweb_edu' (HuggingFaceFW/fineweb-edu) has not been prepared",
           f"`stem-nb prepare fineweb_edu {q}`", "local folder")


def test_missing_tokenizer_file(tmp_path):
    r, before, after = _train(tmp_path, "data.sources.bios=1.0", f"data.tokenizer={tmp_path}/llama2/tokenizer.model")
    _check(r, before, after, f"data.tokenizer='{tmp_path}/llama2/tokenizer.model'", "tokenizer file not found",
           "SentencePiece model")


def test_prepare_cli_unknown_folder(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "STEM_NB_DATA": str(tmp_path / "data")}
    r = subprocess.run([sys.executable, "-c", "import sys; from stem_nb.data import cli; sys.exit(cli(sys.argv[1:]))",
                        str(tmp_path / "nowhere"), str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"stem-nb prepare: data path not found: {tmp_path / 'nowhere'}"
    assert not (tmp_path / "out").exists()


# A tiny byte-level run over bios only: needs no downloaded corpus and no trained tokenizer (258 ids, model 512).
BYTE_BIOS = ["data.sources={bios: 1.0}", "data.source_kwargs={bios: {n_people: 100}}", "data.tokenizer=byte",
             "model.vocab_size=512"]


@pytest.mark.parametrize("bad_id", [300, 600])            # past the tokenizer's 258 ids; past the model's 512 rows too
def test_token_cache_with_ids_past_the_vocabulary(tmp_path, bad_id):
    from stem_nb.config import load_config
    from stem_nb.data import PackedLoader
    from stem_nb.train_config import TrainArgs
    cache = tmp_path / "cache"
    over = [*BYTE_BIOS, f"data.cache_dir={cache}"]
    PackedLoader(load_config(TrainArgs, CONFIG, over).data)           # the caches an earlier run left behind
    (f,) = cache.glob("bios-train-*.npy")
    a = np.load(f); a[len(a) // 2] = bad_id; np.save(f, a)             # one id past the vocabulary: a corrupt cache
    cached = digest(cache)
    r, before, after = _train(tmp_path, *over)
    _check(r, before, after, f"DataError: token cache {f} holds token id {bad_id}, but the tokenizer byte has 258 ids",
           "corrupt or was written for another tokenizer", "delete it")
    assert digest(cache) == cached                                     # the cache is reported, not rewritten


@pytest.mark.parametrize("kwargs, needles", [
    ("{n_people: 200000}", ["data.source_kwargs.bios.n_people=200000: must be an integer from 1 to 111000",
                            "111000 distinct names"]),
    ("{n_people: -5}", ["data.source_kwargs.bios.n_people=-5: must be an integer from 1 to 111000"]),
    ("{n_peple: 50}", ["data.source_kwargs.bios.n_peple: source 'bios' takes no option 'n_peple'", "n_people"]),
])
def test_bios_options_refused_before_anything(tmp_path, kwargs, needles):
    r, before, after = _train(tmp_path, "data.sources={bios: 1.0}", f"data.source_kwargs={{bios: {kwargs}}}")
    _check(r, before, after, *needles)
    assert after == before                                             # refused at config time: not even a lock file
