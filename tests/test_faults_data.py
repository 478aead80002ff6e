"Data faults from the command line, as a user meets them (issue 12): one clear message, exit code 2, nothing lost."
import hashlib, os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "configs" / "debug.yaml"


def _tree_sums(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _train(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    "Run `python -m stem_nb.train debug.yaml OVERRIDES dump_dir=...` on a dump dir holding an earlier run's file."
    dump = tmp_path / "run"
    dump.mkdir()
    (dump / "metrics.jsonl").write_text('{"step": 10, "loss": 3.2}\n')          # written before: must survive
    before = _tree_sums(dump)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "STEM_NB_DATA": str(tmp_path / "data")}
    r = subprocess.run([sys.executable, "-m", "stem_nb.train", str(CONFIG), *overrides, f"dump_dir={dump}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    return r, before, _tree_sums(dump)


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
