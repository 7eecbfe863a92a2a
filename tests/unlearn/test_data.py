"""Tests for the corpus, its splits, the tokenizer and the JSONL files (gradstore_unlearn.data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradstore_unlearn.data import (
    CORPUS_SIZES,
    DOC_SPLITS,
    EOS_TOKEN,
    MAX_ID_BYTES,
    PAD_TOKEN,
    RECORD_SPLITS,
    SPLITS,
    Canary,
    Corpus,
    CorpusError,
    Document,
    _clean_docstring,
    _limit_id,
    build_corpus,
    build_corpus_preset,
    check_canary_tokenization,
    encode_documents,
    load_tokenizer,
    read_corpus,
    read_user_jsonl,
    save_tokenizer,
    stdlib_docstrings,
    train_tokenizer,
    write_corpus,
)

# --------------------------------------------------------------------------------------------
# Shared fixtures: building and tokenizer training take about a second each, so do them once.


@pytest.fixture(scope="module")
def tiny():
    return build_corpus_preset("tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    # Trained on the training set only, as the trainer does; holdout records are unseen text.
    return train_tokenizer(tiny.train_documents(), CORPUS_SIZES["tiny"].vocab_size)


def _records(corpus: Corpus) -> list[Document]:
    return [doc for doc in corpus if doc.kind == "record"]


# --------------------------------------------------------------------------------------------
# Standard-library docstrings


def test_stdlib_docstrings_are_clean_prose_with_unique_ids():
    docs = stdlib_docstrings()
    assert len(docs) > 3000  # about 5300 on CPython 3.11
    ids = [doc_id for doc_id, _ in docs]
    texts = [text for _, text in docs]
    assert len(set(ids)) == len(ids)
    assert len(set(texts)) == len(texts)
    for doc_id, text in docs:
        assert doc_id.startswith("doc:") and len(doc_id.encode()) <= MAX_ID_BYTES
        assert ">>>" not in text
        assert len(text.split()) >= 8
        assert "  " not in text and text == text.strip()
    # Skipped trees: tests, IDLE, lib2to3 and the generated codecs.
    skipped = ("doc:test.", "doc:idlelib", "doc:lib2to3", "doc:encodings.", "doc:turtledemo")
    assert not [doc_id for doc_id in ids if doc_id.startswith(skipped)]
    assert not [doc_id for doc_id in ids if ".test." in doc_id or ".tests." in doc_id]


def test_stdlib_docstring_ids_name_module_and_qualname():
    by_id = dict(stdlib_docstrings())
    # A method, a class and a module docstring, all stable prose since Python 3.11.
    assert "doc:json.decoder.JSONDecoder.decode" in by_id
    assert by_id["doc:json.decoder.JSONDecoder.decode"].startswith("Return the Python representation")
    assert by_id["doc:textwrap.TextWrapper"].startswith("Object for wrapping/filling text.")
    assert by_id["doc:heapq"].startswith("Heap queue algorithm")
    # json's module docstring is mostly doctest examples, so it is left out.
    assert "doc:json" not in by_id


def test_clean_docstring_normalises_and_filters():
    raw = "Compute   the thing\nfrom its parts, carefully.\n\n    Second paragraph has more words here.\n"
    assert _clean_docstring(raw) == "Compute the thing from its parts, carefully.\nSecond paragraph has more words here."
    # Doctest blocks go; the prose around them stays.
    with_doctest = "Add two numbers together and return their sum to the caller.\n\n>>> add(1, 2)\n3\n\nDone."
    assert _clean_docstring(with_doctest) == "Add two numbers together and return their sum to the caller.\nDone."
    assert _clean_docstring("Return x.") is None  # too short
    assert _clean_docstring(">>> a = 1\n>>> b = 2\n>>> a + b\n3\nSum two numbers here together.") is None
    assert _clean_docstring("x = {'a': [1, 2], 'b': (3, 4)}; y = f(x) ** 2 + g(x[0:3])") is None


def test_long_ids_are_cut_to_the_limit_and_stay_unique():
    base = "doc:" + "ü" * 300  # two bytes per character: the cut must not split one
    a, b = _limit_id(base), _limit_id(base + "x")
    assert len(a.encode()) <= MAX_ID_BYTES and len(b.encode()) <= MAX_ID_BYTES
    assert a != b and a == _limit_id(base)
    assert _limit_id("doc:json") == "doc:json"


# --------------------------------------------------------------------------------------------
# Building: determinism, stable IDs, splits


def test_same_seed_gives_identical_corpus(tiny):
    again = build_corpus_preset("tiny")
    assert again.documents == tiny.documents
    assert again.config == tiny.config


def test_seed_changes_records_but_not_docs(tiny):
    other = build_corpus_preset("tiny", seed=1)
    assert [d for d in other if d.kind == "doc"] == [d for d in tiny if d.kind == "doc"]
    assert [d.text for d in _records(other)] != [d.text for d in _records(tiny)]
    assert [d.id for d in _records(other)] == [d.id for d in _records(tiny)]


def test_corpus_is_identical_in_another_process(tmp_path):
    # hash() is salted per process; a set or dict ordering leak would show up here.
    code = (
        "import sys; from gradstore_unlearn.data import build_corpus, write_corpus;"
        "write_corpus(build_corpus(40, 30, seed=3, max_chars=300), sys.argv[1])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "there")], check=True, env=env)
    write_corpus(build_corpus(40, 30, seed=3, max_chars=300), tmp_path / "here")
    here = (tmp_path / "here" / "corpus.jsonl").read_bytes()
    assert (tmp_path / "there" / "corpus.jsonl").read_bytes() == here


def test_ids_are_stable_across_corpus_sizes():
    small, large = build_corpus(50, 40, seed=7), build_corpus(200, 80, seed=7)
    # Records are generated as a stream: the smaller corpus's records are a prefix.
    small_records, large_records = _records(small), _records(large)
    assert [d.id for d in small_records] == [f"rec-{i:06d}" for i in range(40)]
    for a, b in zip(small_records, large_records, strict=False):
        assert (a.id, a.text, a.canary) == (b.id, b.text, b.canary)
    # Docs are chosen by a hash of the ID: the smaller set is a subset, with the same split.
    large_docs = {d.id: d for d in large if d.kind == "doc"}
    for doc in small:
        if doc.kind == "doc":
            assert large_docs[doc.id] == doc


@pytest.mark.parametrize(
    ("n_records", "forget", "holdout"), [(300, 0.1, 0.2), (101, 0.25, 0.25), (50, 0.0, 0.0), (40, 0.5, 0.5)]
)
def test_record_splits_are_disjoint_with_requested_sizes(n_records, forget, holdout):
    corpus = build_corpus(30, n_records, forget_fraction=forget, holdout_fraction=holdout)
    counts = corpus.split_counts()
    assert counts["forget"] == round(n_records * forget)
    assert counts["holdout"] == round(n_records * holdout)
    assert counts["retain"] == n_records - counts["forget"] - counts["holdout"]
    # Each document is in exactly one split; records only in record splits, docs in doc splits.
    assert sum(len(corpus.split(name)) for name in SPLITS) == len(corpus)
    for doc in corpus:
        assert doc.split in (RECORD_SPLITS if doc.kind == "record" else DOC_SPLITS)
    assert all(corpus.by_id[d.id] is d for d in corpus)
    with pytest.raises(ValueError, match="unknown split"):
        corpus.split("test")
    trained = {d.id for d in corpus.train_documents()}
    expected = {d.id for name in ("train", "forget", "retain") for d in corpus.split(name)}
    assert trained == expected
    assert not trained & {d.id for name in ("holdout", "eval") for d in corpus.split(name)}


def test_doc_eval_split_has_about_the_requested_fraction():
    corpus = build_corpus(None, 0, eval_fraction=0.1)
    counts = corpus.split_counts()
    assert counts["train"] + counts["eval"] == len(corpus) > 3000
    # Split by a hash of the ID, so the fraction is approximate (binomial spread ~0.4%).
    assert 0.08 < counts["eval"] / len(corpus) < 0.12


def test_max_chars_cuts_docs_at_a_word_boundary():
    full = {d.id: d.text for d in build_corpus(200, 0)}
    for doc in build_corpus(200, 0, max_chars=120):
        assert len(doc.text) <= 120
        assert full[doc.id].startswith(doc.text)
        rest = full[doc.id][len(doc.text) :]
        assert rest == "" or rest[0].isspace()


def test_bad_build_arguments_are_refused():
    with pytest.raises(ValueError, match="must not exceed 1"):
        build_corpus(0, 10, forget_fraction=0.6, holdout_fraction=0.6)
    with pytest.raises(ValueError, match="usable docstrings"):
        build_corpus(10**7, 0)
    with pytest.raises(ValueError, match="secret_length"):
        build_corpus(0, 10, secret_length=0)


# --------------------------------------------------------------------------------------------
# Canaries


def test_every_record_has_a_well_formed_canary(tiny):
    records = _records(tiny)
    assert len(records) == CORPUS_SIZES["tiny"].n_records
    for doc in records:
        c = doc.canary
        assert c is not None and c.length == 4 and c.alphabet == "0123456789"
        assert c.space_size == 10**4
        assert len(c.secret) == 4 and c.secret.isdigit()
        assert doc.text.startswith(c.prefix + c.secret)
        # The prefix ends right before the secret and the secret ends its sentence.
        assert c.prefix.endswith(" ")
        assert doc.text[len(c.prefix) + 4] == "."
        # The paragraph is personal: an email address and a date of birth come with it.
        assert "@" in doc.text
        assert "born" in doc.text or "date of birth" in doc.text
    assert all(d.canary is None for d in tiny if d.kind == "doc")


def test_secret_length_is_configurable():
    for doc in _records(build_corpus(0, 20, secret_length=6)):
        assert len(doc.canary.secret) == 6 and doc.canary.space_size == 10**6


def test_secrets_are_uniform_over_digits():
    # 8000 digits: each digit's count is ~800 with sd ~27; the seed fixes the draw, so this
    # checks the sampler (not luck) with a wide margin.
    digits = Counter("".join(d.canary.secret for d in _records(build_corpus(0, 2000, seed=11))))
    assert set(digits) == set("0123456789")
    assert all(680 < n < 920 for n in digits.values())


def test_canary_and_document_validation():
    with pytest.raises(ValueError, match="length"):
        Canary(prefix="PIN is ", secret="123", length=4)
    with pytest.raises(ValueError, match="outside"):
        Canary(prefix="PIN is ", secret="12a4", length=4)
    with pytest.raises(ValueError, match="must not end"):
        Canary(prefix="PIN is 9", secret="1234", length=4)
    canary = Canary(prefix="PIN is ", secret="1234", length=4)
    assert Document(id="r", text="PIN is 1234.", kind="record", canary=canary).canary == canary
    with pytest.raises(ValueError, match="does not start"):
        Document(id="r", text="PIN is 9999.", kind="record", canary=canary)
    with pytest.raises(ValueError, match="run on"):
        Document(id="r", text="PIN is 12345.", kind="record", canary=canary)
    with pytest.raises(ValueError, match="only records"):
        Document(id="r", text="PIN is 1234.", kind="doc", canary=canary)
    with pytest.raises(ValueError, match="duplicate"):
        Corpus((Document(id=7, text="a"), Document(id="7", text="b")))


# --------------------------------------------------------------------------------------------
# Tokenizer


def test_every_digit_is_one_token(tokenizer):
    for digit in "0123456789":
        ids = tokenizer(digit).input_ids
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [digit]
    assert tokenizer("12345").input_ids == [tokenizer.convert_tokens_to_ids(d) for d in "12345"]


def test_canary_prefix_and_secret_tokenize_independently_for_every_record(tiny, tokenizer):
    records = _records(tiny)
    # Holdout records included: the tokenizer never saw them.
    assert {d.split for d in records} == set(RECORD_SPLITS)
    for doc in records:
        c = doc.canary
        prefix, secret = tokenizer(c.prefix).input_ids, tokenizer(c.secret).input_ids
        assert prefix + secret == tokenizer(c.prefix + c.secret).input_ids, doc.id
        assert len(secret) == c.length, doc.id
        # And inside the full text, which is what the model is trained on.
        assert tokenizer(doc.text).input_ids[: len(prefix) + c.length] == prefix + secret, doc.id
    check_canary_tokenization(tokenizer, tiny)


@settings(max_examples=100, deadline=None)
@given(prefix=st.text(max_size=40), secret=st.text(alphabet="0123456789", min_size=1, max_size=8))
def test_any_prefix_and_any_candidate_secret_concatenate(tokenizer, prefix, secret):
    # Exposure enumerates every candidate secret after a canary's prefix; digits are split
    # before BPE, so the property holds for any text at all in front of them.
    ids = tokenizer(prefix + secret).input_ids
    assert ids == tokenizer(prefix).input_ids + tokenizer(secret).input_ids
    assert len(tokenizer(secret).input_ids) == len(secret)


def test_check_canary_tokenization_catches_a_bad_tokenizer(tiny):
    # A tokenizer trained without digit splitting merges digits, which the check must refuse.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        [d.text for d in tiny] * 3,
        trainers.BpeTrainer(vocab_size=3000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    with pytest.raises(ValueError, match="tokens"):
        check_canary_tokenization(PreTrainedTokenizerFast(tokenizer_object=raw), tiny)


def test_special_tokens_and_no_implicit_specials(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == CORPUS_SIZES["tiny"].vocab_size
    assert tokenizer("hello").input_ids == tokenizer("hello", add_special_tokens=False).input_ids
    text = "Ünïcode ✓ survives: 12 €\nnew line"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_tokenizer_save_load_round_trip(tiny, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tokenizer, tmp_path / "tok")
    texts = [d.text for d in tiny]
    expected = tokenizer(texts).input_ids
    for loaded in (load_tokenizer(tmp_path / "tok"), AutoTokenizer.from_pretrained(str(tmp_path / "tok"))):
        assert loaded(texts).input_ids == expected
        assert (loaded.eos_token_id, loaded.bos_token_id, loaded.pad_token_id) == (
            tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
        )
        check_canary_tokenization(loaded, tiny)


def test_encode_documents_truncates_and_appends_eos(tiny, tokenizer):
    eos = tokenizer.eos_token_id
    docs = list(tiny)[:50]
    encoded = encode_documents(tokenizer, docs, max_length=16)
    assert len(encoded) == len(docs)
    for doc, ids in zip(docs, encoded, strict=True):
        assert len(ids) <= 16 and ids[-1] == eos
        assert ids[:-1] == tokenizer(doc.text).input_ids[:15]
    assert encode_documents(tokenizer, ["hi"], 100) == [[*tokenizer("hi").input_ids, eos]]
    assert encode_documents(tokenizer, [], 10) == []
    with pytest.raises(ValueError):
        encode_documents(tokenizer, ["hi"], 1)
    with pytest.raises(ValueError, match="document 1 has no text to encode"):
        encode_documents(tokenizer, ["hi", " "], 10)


def test_encode_documents_says_how_many_documents_it_cut(tokenizer, caplog):
    """What is cut is never trained on or captured: a user's corpus must not lose its tails silently."""
    with caplog.at_level("WARNING", logger="gradstore_unlearn"):
        encode_documents(tokenizer, ["a short one", "one " * 40, "two " * 40], max_length=16)
    assert "2 of 3 documents are longer than 15 tokens and were cut" in caplog.text


def test_docstrings_equal_after_the_cut_are_replaced_not_dropped():
    from gradstore_unlearn.data import _select_docs

    docs = _select_docs(2000, 40, 0.1)
    assert len(docs) == 2000 and len({d.text for d in docs}) == 2000
    with pytest.raises(ValueError, match="remain distinct when cut to 10 characters"):
        _select_docs(2000, 10, 0.1)


def test_tiny_preset_fits_its_sequence_length(tiny, tokenizer):
    # A record cut short would lose its canary, so every record must fit whole.
    size = CORPUS_SIZES["tiny"]
    lengths = [len(ids) for ids in encode_documents(tokenizer, _records(tiny), 10**6)]
    assert max(lengths) <= size.max_tokens
    # And the whole training set stays small enough for a two-minute CPU run.
    total = sum(len(ids) for ids in encode_documents(tokenizer, tiny.train_documents(), size.max_tokens))
    assert total < 80_000


# --------------------------------------------------------------------------------------------
# Corpus files


def test_write_and_read_corpus_round_trip(tiny, tmp_path):
    paths = write_corpus(tiny, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "corpus.jsonl", "corpus.json", "train.jsonl", "forget.jsonl", "retain.jsonl",
        "holdout.jsonl", "eval.jsonl",
    }
    again = read_corpus(tmp_path / "out")
    assert again.documents == tiny.documents
    assert again.config == tiny.config
    assert read_corpus(paths["corpus"]).documents == tiny.documents

    # train.jsonl is the whole training set; the other files one split each.
    assert [d.id for d in read_corpus(paths["train"])] == [d.id for d in tiny.train_documents()]
    for name in ("forget", "retain", "holdout", "eval"):
        assert read_corpus(paths[name]).documents == tuple(tiny.split(name))

    summary = json.loads(paths["summary"].read_text())
    assert summary["documents"] == len(tiny)
    assert summary["splits"] == tiny.split_counts()
    assert summary["config"]["preset"] == "tiny"

    # Lines carry all fields, canary included, and the user reader accepts them too.
    first_record = next(json.loads(line) for line in paths["forget"].open() if line.strip())
    assert set(first_record) == {"id", "text", "kind", "split", "canary"}
    assert first_record["canary"]["secret"].isdigit()
    user_docs = read_user_jsonl(paths["train"])
    assert [d.text for d in user_docs] == [d.text for d in tiny.train_documents()]


def test_corpus_with_integer_ids_round_trips(tmp_path):
    corpus = Corpus((Document(id=3, text="three"), Document(id="x", text="ex", split="eval")))
    write_corpus(corpus, tmp_path)
    assert read_corpus(tmp_path).documents == corpus.documents


def test_read_corpus_reports_bad_lines(tmp_path):
    path = tmp_path / "corpus.jsonl"
    good = json.dumps(Document(id="a", text="x").to_json())
    path.write_text(good + "\n" + json.dumps({"id": "b", "text": "y"}) + "\n" + good + "\n")
    with pytest.raises(CorpusError) as err:
        read_corpus(path)
    assert [line for line, _ in err.value.problems] == [2, 3]
    assert "line 2: missing 'kind', 'split'" in str(err.value)
    assert "line 3: duplicate id 'a' (first on line 1)" in str(err.value)


# --------------------------------------------------------------------------------------------
# User JSONL


def _write_lines(path, lines: list[str]) -> None:
    path.write_bytes("\n".join(lines).encode() + b"\n")


def test_read_user_jsonl_accepts_good_files(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"id": "a", "text": "Hello there."}\r\n'  # byte-order mark and CRLF
        b"\n   \n"  # blank lines are skipped
        b'{"id": 0, "text": "Integer ids stay integers.", "source": "extra fields are ignored"}\n'
        b'{"id": "caf\xc3\xa9", "text": "  leading spaces kept"}'  # no final newline
    )
    docs = read_user_jsonl(path)
    assert [d.id for d in docs] == ["a", 0, "café"]
    assert isinstance(docs[1].id, int)
    assert docs[2].text == "  leading spaces kept"
    assert all(d.kind == "doc" and d.split == "train" and d.canary is None for d in docs)


LONG_ID = "x" * (MAX_ID_BYTES + 1)


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("{not json", "invalid JSON"),
        ('{"id": "a", "text": "x"} trailing', "invalid JSON"),
        ('["id", "text"]', "expected a JSON object"),
        ('"just a string"', "expected a JSON object"),
        ('{"text": "no id"}', "missing 'id'"),
        ('{"id": "no-text"}', "missing 'text'"),
        ('{"id": 1.5, "text": "x"}', "'id' must be a string or a non-negative integer, not a number"),
        ('{"id": true, "text": "x"}', "not a boolean"),
        ('{"id": null, "text": "x"}', "not null"),
        ('{"id": ["a"], "text": "x"}', "not an array"),
        ('{"id": -1, "text": "x"}', "non-negative integer, got -1"),
        ('{"id": "", "text": "x"}', "'id' is an empty string"),
        (json.dumps({"id": LONG_ID, "text": "x"}), f"'id' is {MAX_ID_BYTES + 1} bytes"),
        (json.dumps({"id": "é" * 129, "text": "x"}), "258 bytes"),
        (json.dumps({"id": int("9" * 257), "text": "x"}), "257 bytes"),
        ('{"id": "\\ud800", "text": "x"}', "unpaired surrogate"),
        ('{"id": "b", "text": 5}', "'text' must be a string, not an integer"),
        ('{"id": "b", "text": null}', "'text' must be a string, not null"),
        ('{"id": "b", "text": ""}', "'text' is empty"),
        ('{"id": "b", "text": " \\n\\t "}', "'text' is empty"),
        ('{"id": "b", "text": "bad \\udc80"}', "unpaired surrogate"),
        ('{"id": 9223372036854775808, "text": "x"}', "larger than 2**63 - 1"),
        ('{"id": ' + "7" * 5000 + ', "text": "x"}', "invalid JSON: Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, "invalid JSON: maximum recursion depth"),
        ('{"id": "a", "text": "x", "id": "b"}', "the key 'id' appears twice in one object"),
    ],
)
def test_read_user_jsonl_reports_each_bad_line_with_its_number(tmp_path, bad_line, problem):
    path = tmp_path / "user.jsonl"
    # A good line and a blank one first: the number must count physical lines, blanks included.
    _write_lines(path, ['{"id": "ok", "text": "fine"}', "", bad_line, '{"id": "ok2", "text": "fine"}'])
    with pytest.raises(CorpusError) as err:
        read_user_jsonl(path)
    assert isinstance(err.value, ValueError)
    assert err.value.line == 3 and len(err.value.problems) == 1
    assert str(err.value).startswith(f"{path}, line 3: ")
    assert problem in str(err.value)


def test_ids_of_exactly_the_limit_are_accepted(tmp_path):
    path = tmp_path / "user.jsonl"
    _write_lines(path, [json.dumps({"id": "é" * 128, "text": "x"}), json.dumps({"id": "y" * MAX_ID_BYTES, "text": "x"})])
    assert len(read_user_jsonl(path)) == 2


def test_read_user_jsonl_reports_invalid_utf8_with_its_line(tmp_path):
    path = tmp_path / "user.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "\xff"}\n')
    with pytest.raises(CorpusError, match=r"line 2: not valid UTF-8"):
        read_user_jsonl(path)


def test_duplicate_ids_name_the_id_and_both_lines(tmp_path):
    path = tmp_path / "user.jsonl"
    _write_lines(path, ['{"id": "a", "text": "one"}', '{"id": "b", "text": "two"}', '{"id": "a", "text": "three"}'])
    with pytest.raises(CorpusError) as err:
        read_user_jsonl(path)
    assert str(err.value) == f"{path}, line 3: duplicate id 'a' (first on line 1)"


def test_integer_and_string_forms_of_an_id_are_duplicates(tmp_path):
    # 7 and "7" would collide in any store keyed by text, so they are refused together.
    path = tmp_path / "user.jsonl"
    _write_lines(path, ['{"id": 7, "text": "one"}', '{"id": "7", "text": "two"}'])
    with pytest.raises(CorpusError, match=r"line 2: duplicate id '7' \(first on line 1\)"):
        read_user_jsonl(path)


def test_all_bad_lines_are_reported_together(tmp_path):
    path = tmp_path / "user.jsonl"
    _write_lines(path, ["{", '{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}', '{"id": 2}'])
    with pytest.raises(CorpusError) as err:
        read_user_jsonl(path)
    assert [line for line, _ in err.value.problems] == [1, 3, 4]
    message = str(err.value)
    assert message.startswith(f"{path}: 3 problems:")
    for fragment in ("line 1: invalid JSON", "line 3: duplicate id 'a'", "line 4: missing 'text'"):
        assert fragment in message


def test_many_bad_lines_are_summarised(tmp_path):
    path = tmp_path / "user.jsonl"
    _write_lines(path, ["{"] * 25)
    with pytest.raises(CorpusError, match=r"25 problems:(.|\n)*and 5 more") as err:
        read_user_jsonl(path)
    assert len(err.value.problems) == 25


def test_empty_user_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(CorpusError, match="no documents") as err:
        read_user_jsonl(path)
    assert err.value.line is None
