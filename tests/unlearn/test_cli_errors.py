"""The `gradstore` command line's input handling: which ID or text a query names, strict JSON, one-line errors
(exit 2) for bad paths and values, and nothing written when a value is refused.

Runs `main()` in-process on a copy of the server tests' template (a tiny model with a tokenizer, and a store
whose IDs include both the integer 3 and the string "3"); only the closed-pipe case needs a real process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradstore import GradStore
from gradstore_unlearn import cli
from gradstore_unlearn.unlearn import Unlearner

# The template is built by the server tests' helper module (a sibling test directory, not a package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_support import build_template


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return build_template(tmp_path_factory.mktemp("cli-template"))


@pytest.fixture
def ws(template, tmp_path):
    shutil.copytree(template.store, tmp_path / "store")
    shutil.copytree(template.model, tmp_path / "model")
    return tmp_path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gradstore: "), err
    return lines[0]


@pytest.fixture
def influence_calls(monkeypatch):
    """The (query, query_type) of every `Unlearner.influence` call the command makes."""
    calls = []
    real = Unlearner.influence

    def spy(self, query, k=10, **kwargs):
        calls.append((query, kwargs.get("query_type")))
        return real(self, query, k, **kwargs)

    monkeypatch.setattr(Unlearner, "influence", spy)
    return calls


# ------------------------------------------------------------------------------------------ influence
def test_influence_id_is_never_read_as_a_text(ws, capsys, influence_calls):
    code, out, err = run(capsys, "influence", "--store", ws / "store", "--model", ws / "model", "--id", "nobody")
    assert code == 2 and out == ""
    assert one_line_error(err) == "gradstore: unknown ID 'nobody': not in the store"
    assert influence_calls == [("nobody", "id")]


def test_influence_text_is_never_read_as_an_id(ws, capsys, influence_calls):
    # "rec-1" is also a stored ID; --text says it is a text to score
    code, out, _ = run(capsys, "influence", "--store", ws / "store", "--model", ws / "model", "--text",
                       "rec-1 lives here", "--k", 3, "--json")
    assert code == 0 and len(strict_json(out)) == 3
    assert influence_calls == [("rec-1 lives here", "text")]


@pytest.mark.parametrize(("id_type", "expected"), [("auto", "3"), ("str", "3"), ("int", 3)])
def test_influence_id_type(ws, capsys, influence_calls, id_type, expected):
    code, out, _ = run(capsys, "influence", "--store", ws / "store", "--model", ws / "model", "--id", "3",
                       "--id-type", id_type, "--k", 2, "--json")
    assert code == 0
    assert influence_calls == [(expected, "id")]
    assert expected not in [r["id"] for r in strict_json(out)]  # the query itself is left out


@pytest.mark.parametrize(("id_type", "expected"), [("auto", ["3", "rec-1"]), ("int", [3, 1]),
                                                   ("str", ["3", "rec-1"])])
def test_forget_id_type(ws, capsys, id_type, expected):
    ids = ["3", "rec-1"] if id_type != "int" else ["3", "1"]
    code, out, _ = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids", *ids,
                       "--id-type", id_type, "--dry-run", "--json")
    assert code == 0
    assert strict_json(out)["ids"] == expected


def test_id_type_int_refuses_a_non_integer(ws, capsys):
    code, _, err = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids", "rec-1",
                       "--id-type", "int", "--dry-run")
    assert code == 2 and "'rec-1' is not a non-negative integer" in one_line_error(err)


# ----------------------------------------------------------------------------------------------- JSON
def test_json_output_is_strict(ws, capsys):
    store = GradStore.open(ws / "store")
    store.append_audit({"kind": "forget", "request_id": "r1", "id_hashes": [],
                        "metrics_before": {"forget_loss": 1.0, "retain_loss": float("nan")},
                        "metrics_after": {"forget_loss": float("inf"), "retain_loss": float("nan")}})
    code, out, _ = run(capsys, "audit", "--store", ws / "store", "--json")
    assert code == 0
    trained, record = strict_json(out)  # training recorded the model it ended with, first
    assert trained["kind"] == "trained" and record["metrics_before"] == {"forget_loss": 1.0, "retain_loss": None}
    assert record["metrics_after"] == {"forget_loss": None, "retain_loss": None}
    code, out, _ = run(capsys, "info", ws / "store", "--json")
    assert code == 0 and strict_json(out)["examples"] == 44


def test_the_audit_table_names_the_requests_a_commit_carries(ws, capsys):
    store = GradStore.open(ws / "store")
    store.append_audit({"kind": "forget", "request_id": "done", "id_hashes": [], "model_hash_after": "ab" * 32,
                        "carries": [{"request_id": "short-1", "status": "target_not_met",
                                     "model_hash_before": "00" * 32, "model_hash_after": "11" * 32}]})
    code, out, _ = run(capsys, "audit", "--store", ws / "store")
    assert code == 0
    (row,) = [line for line in out.splitlines() if "done" in line]
    assert "short-1" in row and "carries" in out


def test_audit_follows_the_hash_chain_to_the_saved_model(ws, capsys):
    from gradstore_unlearn.train import load_model
    from gradstore_unlearn.unlearn import model_hash

    on_disk = model_hash(load_model(ws / "model")[0])
    code, out, _ = run(capsys, "audit", "--store", ws / "store", "--model", ws / "model", "--json")
    chain = strict_json(out)["chain"]
    # Nothing audited yet, and the weights on disk are the ones training recorded: nothing to break.
    assert code == 0 and chain["whole"] and chain["commits"] == 0 and chain["trained_hash"] == on_disk
    code, out, _ = run(capsys, "audit", "--store", ws / "store", "--model", ws / "model")
    assert code == 0 and f"hash chain: whole: 0 commit(s), 0 carried change(s), from the trained model {on_disk[:16]}" \
        in out and "(trained)" in out
    store = GradStore.open(ws / "store")
    store.append_audit({"kind": "forget", "request_id": "a", "id_hashes": [], "model_hash_before": on_disk,
                        "model_hash_after": "2" * 64})
    code, out, _ = run(capsys, "audit", "--store", ws / "store", "--model", ws / "model")
    assert code == 4 and "hash chain: BROKEN" in out and "not the ones the last commit saved" in out
    store.append_audit({"kind": "forget", "request_id": "b", "id_hashes": [], "model_hash_before": "2" * 64,
                        "model_hash_after": on_disk})
    code, out, _ = run(capsys, "audit", "--store", ws / "store", "--model", ws / "model", "--json")
    chain = strict_json(out)["chain"]
    assert code == 0 and chain["whole"] and chain["last_hash"] == chain["model_hash"] == on_disk


def test_audit_adopt_continues_the_chain_from_a_model_changed_off_the_record(ws, capsys):
    from gradstore_unlearn.train import load_model
    from gradstore_unlearn.unlearn import model_hash, save_weights_atomically

    model = load_model(ws / "model")[0]
    with __import__("torch").no_grad():
        model.get_input_embeddings().weight[3] += 0.5  # fine-tuned after training, say
    save_weights_atomically(model, ws / "model")
    code, out, err = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids", "rec-1")
    assert code == 2 and "is not the one the store's audit log ends at" in one_line_error(err)
    assert run(capsys, "audit", "--store", ws / "store", "--model", ws / "model")[0] == 4
    code, out, _ = run(capsys, "audit", "--store", ws / "store", "--model", ws / "model", "--adopt", "--json")
    chain = strict_json(out)["chain"]
    assert code == 0 and chain["whole"] and chain["adopted"][0]["model_hash"] == model_hash(model)
    assert "(adopted)" in run(capsys, "audit", "--store", ws / "store")[1]
    code, out, err = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids", "rec-1",
                         "--dry-run")
    assert code == 0, err


# ------------------------------------------------------------------------------------- paths, pipes
def test_unusable_paths_are_one_line_errors(ws, capsys):
    a_file = ws / "a-file"
    a_file.write_text("x\n")
    engine = ["--store", ws / "store", "--model", ws / "model"]
    cases = [
        (["forget", *engine, "--ids", "1", "--holdout", ws, "--dry-run"], f"{ws}: Is a directory"),
        (["forget", *engine, "--ids-file", ws, "--dry-run"], f"{ws}: Is a directory"),
        (["train", "--store", ws / "new-store", "--out", ws / "new-model", "--data", ws], f"{ws}: Is a directory"),
        (["corpus", "--out", a_file / "sub"], f"{a_file / 'sub'}: Not a directory"),
        (["info", a_file], str(a_file)),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert message in one_line_error(err), argv
    assert not (ws / "new-store").exists() and not (ws / "new-model").exists()


def test_a_closed_pipe_ends_quietly(ws):
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from gradstore_unlearn.cli import main; "
                             f"sys.exit(main(['info', {str(ws / 'store')!r}]))"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes (`gradstore info STORE | head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141
    assert err == ""


# ------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize(("argv", "message"), [
    (["--limit", "0"], "argument --limit: must be at least 1, got 0"),
    (["--limit", "x"], "argument --limit: expected an integer"),
    (["--threshold", "1.5"], "argument --threshold: must lie in [0, 1], got 1.5"),
    (["--threshold", "-0.1"], "argument --threshold: must lie in [0, 1]"),
    (["--threshold", "nan"], "argument --threshold: must lie in [0, 1]"),
])
def test_find_validates_its_values(ws, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["find", "--store", str(ws / "store"), "--model", str(ws / "model"), "--text", "Alice", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_find_needs_the_model_for_its_tokenizer(ws, template, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["find", "--store", str(ws / "store"), "--text", "Alice"])
    assert exit_.value.code == 2 and "the following arguments are required: --model" in capsys.readouterr().err
    code, out, _ = run(capsys, "find", "--store", ws / "store", "--model", ws / "model", "--text",
                       template.texts[5], "--threshold", 0, "--limit", 1, "--json")
    assert code == 0 and [m["id"] for m in strict_json(out)] == [5]


def test_forget_threshold_must_be_above_zero(ws, capsys):
    with pytest.raises(SystemExit) as exit_:  # at 0 every stored example would match
        cli.main(["forget", "--store", str(ws / "store"), "--model", str(ws / "model"), "--text", "Alice",
                  "--threshold", "0", "--dry-run"])
    assert exit_.value.code == 2 and "must lie in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--lr", "nan"], "lr must be a finite number > 0"),
])
def test_train_refuses_bad_values_before_writing_anything(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, "train", "--store", tmp_path / "store", "--out", tmp_path / "model", *argv)
    assert code == 2 and message in one_line_error(err)
    assert list(tmp_path.iterdir()) == []


def _failing_train(monkeypatch, error: BaseException):
    """`train_model` that captures one example, then fails as an interrupted or crashed run would."""
    from gradstore_unlearn import train as train_module

    real = train_module.train_model

    def train_then_fail(model, sequences, ids, config, **kwargs):
        real(model, sequences[:1], ids[:1], config, **kwargs)
        raise error

    monkeypatch.setattr(train_module, "train_model", train_then_fail)


def _user_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"doc-{i}", "text": f"record {i}: a short line of text"}) + "\n"
                            for i in range(6)))
    return path


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), KeyboardInterrupt()])
def test_train_that_fails_removes_the_store_it_created(tmp_path, capsys, monkeypatch, error):
    _failing_train(monkeypatch, error)
    argv = ["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "model"),
            "--data", str(_user_corpus(tmp_path)), "--epochs", "1"]
    if isinstance(error, KeyboardInterrupt):
        assert cli.main(argv) == 130
    else:
        with pytest.raises(RuntimeError, match="out of memory"):
            cli.main(argv)
    assert not (tmp_path / "store").exists() and not (tmp_path / "model").exists()
    assert "removed the store it had created" in capsys.readouterr().err


def _empty_store_like(path: Path, store: Path) -> Path:
    reference = GradStore.open(store)
    GradStore.create(path, dim=reference.dim, vocab_size=reference.vocab_size, dtype=reference.dtype)
    return path


def test_train_refuses_another_runs_store_and_a_saved_model(tmp_path, capsys):
    corpus, store, model = _user_corpus(tmp_path), tmp_path / "store", tmp_path / "model"
    assert cli.main(["train", "--store", str(store), "--out", str(model), "--data", str(corpus), "--epochs", "1",
                     "--json"]) == 0
    held = len(GradStore.open(store))
    capsys.readouterr()
    # Another run's gradients do not go beside these (with the `first` policy its shared IDs would not even be
    # captured), and a saved model is never overwritten: both refused before any training.
    for out, into, says in ((tmp_path / "again", store, "already holds"), (model, tmp_path / "new", "not empty")):
        assert cli.main(["train", "--store", str(into), "--out", str(out), "--data", str(corpus), "--epochs", "1",
                         "--json"]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert len(GradStore.open(store)) == held and not (tmp_path / "again").exists()
    assert not (tmp_path / "new").exists()
    # An empty store of another shape is refused too.
    GradStore.create(tmp_path / "narrow", dim=8, vocab_size=50, dtype="float32")
    assert cli.main(["train", "--store", str(tmp_path / "narrow"), "--out", str(tmp_path / "m3"), "--data",
                     str(corpus), "--epochs", "1", "--json"]) == 2
    assert "train into a new store" in capsys.readouterr().err


def test_train_that_fails_leaves_an_existing_store_and_says_so(tmp_path, capsys, monkeypatch):
    corpus = _user_corpus(tmp_path)
    assert cli.main(["train", "--store", str(tmp_path / "first"), "--out", str(tmp_path / "model"), "--data",
                     str(corpus), "--epochs", "1", "--json"]) == 0
    store = _empty_store_like(tmp_path / "store", tmp_path / "first")  # made with options of one's own, say
    _failing_train(monkeypatch, RuntimeError("disk full"))
    with pytest.raises(RuntimeError):
        cli.main(["train", "--store", str(store), "--out", str(tmp_path / "again"), "--data", str(corpus),
                  "--epochs", "1", "--json"])
    assert len(GradStore.open(store).ids()) == 1  # what it captured stays: the store was not the run's own
    assert "remain in the existing store" in capsys.readouterr().err


def test_train_records_the_trained_model_only_once_it_is_saved(tmp_path, capsys, monkeypatch):
    from gradstore_unlearn import train
    from gradstore_unlearn.unlearn import model_hash

    corpus, store = _user_corpus(tmp_path), tmp_path / "store"
    assert cli.main(["train", "--store", str(store), "--out", str(tmp_path / "model"), "--data", str(corpus),
                     "--epochs", "1", "--json"]) == 0
    (trained,) = GradStore.open(store).audit_log()
    assert trained["kind"] == "trained" and trained["model_hash"] == model_hash(train.load_model(tmp_path / "model")[0])

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "save_model", no_room)
    empty = _empty_store_like(tmp_path / "empty", store)
    assert cli.main(["train", "--store", str(empty), "--out", str(tmp_path / "again"), "--data", str(corpus),
                     "--epochs", "1", "--json"]) == 2
    # A model that was never saved is no start of an audit chain.
    assert GradStore.open(empty).audit_log() == []


def test_loading_a_model_draws_no_bar_and_keeps_the_callers_setting(ws, capfd):
    import transformers

    from gradstore_unlearn.train import load_model

    transformers.utils.logging.enable_progress_bar()
    load_model(ws / "model")
    assert "Loading" not in capfd.readouterr().err
    assert transformers.utils.logging.is_progress_bar_enabled()


# ------------------------------------------------------------------------------------------ IDs, forget
def test_an_erased_string_id_still_names_itself(ws, capsys):
    """Once the string "3" is erased, `--ids 3` (auto) still names it, reported already forgotten: it never
    turns into the integer 3, which is another example."""
    GradStore.open(ws / "store").erase(["3"])
    code, out, _ = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids", "3",
                       "--dry-run", "--json")
    assert code == 0
    report = strict_json(out)
    assert report["ids"] == [] and report["already_forgotten"] == ["3"]
    code, out, _ = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids", "3",
                       "--id-type", "int", "--dry-run", "--json")
    assert code == 0 and strict_json(out)["ids"] == [3]


def test_only_a_canonical_decimal_names_an_integer(ws, capsys):
    code, _, err = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids", "007",
                       "--dry-run")
    assert code == 2 and "unknown ID '007'" in one_line_error(err)
    code, out, _ = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids", "7", "0",
                       "--dry-run", "--json")
    assert code == 0 and strict_json(out)["ids"] == [7, 0]


@pytest.mark.parametrize("request_id", ["dsr/2026/42", "../gradstore", "", "two words"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_bad_request_id_is_refused_before_anything_changes(ws, capsys, request_id, dry_run):
    # Request ids name objects in the store (requests/<id>.json): a '/' made a directory of the journal that
    # no later command (nor the server) could open.
    argv = ["forget", "--store", ws / "store", "--model", ws / "model", "--ids", "10", "--id-type", "int",
            "--request-id", request_id] + (["--dry-run"] if dry_run else [])
    before = sorted(p.relative_to(ws) for p in ws.rglob("*"))
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert "invalid request id" in one_line_error(err)
    assert sorted(p.relative_to(ws) for p in ws.rglob("*")) == before


def test_forget_refuses_a_model_another_process_holds(ws, capsys):
    """A server (or another `gradstore forget`) holds the model directory: a forget beside it would be undone
    by the holder's next save, so it is refused; a dry run changes nothing and may run."""
    from gradstore_unlearn.model_lock import ModelDirLock

    argv = ["forget", "--store", ws / "store", "--model", ws / "model", "--ids", "rec-1"]
    with ModelDirLock(ws / "model"):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == ""
        assert "in use by another gradstore process" in one_line_error(err)
        assert run(capsys, *argv, "--dry-run")[0] == 0
    assert "rec-1" in GradStore.open(ws / "store")
    assert not (ws / "model" / ".gradstore-server.lock").exists()


def test_ids_file_lines_are_ids_as_stored(ws, capsys):
    ids_file = ws / "ids.txt"
    ids_file.write_text("rec-1\n\n7\n")
    code, out, _ = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids-file",
                       ids_file, "--dry-run", "--json")
    assert code == 0 and strict_json(out)["ids"] == ["rec-1", 7]
    ids_file.write_text(" rec-1\n")  # not silently read as another ID: spaces are part of an ID
    code, _, err = run(capsys, "forget", "--store", ws / "store", "--model", ws / "model", "--ids-file",
                       ids_file, "--dry-run")
    assert code == 2 and "unknown ID ' rec-1'" in one_line_error(err)


# ----------------------------------------------------------------------------------- more bad input
def test_bad_input_is_exit_2_with_one_line(ws, capsys):
    no_tokenizer = ws / "no-tokenizer"
    shutil.copytree(ws / "model", no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    holdout = ws / "holdout.jsonl"
    holdout.write_text(json.dumps({"id": 1, "text": "hello there"}) + "\n")
    not_utf8 = ws / "ids.txt"
    not_utf8.write_bytes(b"rec-1\n\xff\xfe\n")
    cases = [
        (["info", ws / "store", "--storage-option", "noequals"], "--storage-option expects KEY=VALUE"),
        (["forget", "--store", ws / "store", "--model", no_tokenizer, "--ids", "rec-1", "--holdout", holdout,
          "--dry-run"], "--holdout needs the model directory's tokenizer"),
        (["find", "--store", ws / "store", "--model", ws / "model", "--text", ""], "text to match is empty"),
        (["find", "--store", ws / "store", "--model", ws / "model", "--text", " "], "text to match is empty"),
        (["forget", "--store", ws / "store", "--model", ws / "model", "--text", " "], "text to match is empty"),
        (["forget", "--store", ws / "store", "--model", ws / "model", "--ids", "rec-1", "--threshold", "0.5"],
         "--threshold applies to --text only"),
        (["forget", "--store", ws / "store", "--model", ws / "model", "--ids-file", not_utf8], "not UTF-8 text"),
        (["train", "--store", ws / "new-store", "--out", ws / "new-model", "--device", "bogus"], "unknown device"),
        (["audit", "--store", ws / "store", "--adopt"], "--adopt needs --model"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "", argv
        assert message in one_line_error(err), argv


def test_demo_json_prints_only_json_on_stdout(monkeypatch, tmp_path, capsys):
    from gradstore_unlearn import demo

    def fake_demo(out, size, **kwargs):
        print("[   0.0s] training ...")  # as the demo's progress lines and tables are printed
        print("Does it forget?")
        checks = [{"check": "forgotten", "value": 1.0, "passed": True}]
        return {"checks": checks, "seconds": 1.0, "requests": []}

    monkeypatch.setattr(demo, "run_demo", fake_demo)
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo", "--json")
    assert code == 0
    assert strict_json(out)["checks"][0]["passed"] is True
    assert "Does it forget?" in err
    code, out, _ = run(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 0 and "Does it forget?" in out


def test_drift_shows_sets_and_clears_the_stores_budget(ws, capsys):
    where = ("--store", ws / "store", "--model", ws / "model")
    code, out, _ = run(capsys, "drift", *where, "--json")
    assert code == 0 and strict_json(out) == {"budget": None}
    code, out, _ = run(capsys, "drift", *where, "--set", "0.05", "--panel", "8", "--json")
    doc = strict_json(out)
    assert code == 0 and doc["budget"] == 0.05 and doc["kind"] == "perplexity" and doc["members"] == 8
    assert doc["change"] == 0
    code, out, _ = run(capsys, "drift", *where)
    assert code == 0 and "+5.00% (perplexity)" in out and "change since the baseline" in out and "+0.00%" in out
    code, out, _ = run(capsys, "drift", *where, "--clear")
    assert code == 0 and "no drift budget (removed)" in out
    assert strict_json(run(capsys, "drift", *where, "--json")[1]) == {"budget": None}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["drift", *map(str, where), "--set", "0"])
    assert exit_.value.code == 2 and "must be above 0 and below 10" in capsys.readouterr().err
    code, _, err = run(capsys, "drift", *where, "--panel", "8")
    assert code == 2 and "go with --set" in one_line_error(err)


def test_drift_raises_a_budget_and_keeps_its_baseline(ws, capsys):
    where = ("--store", ws / "store", "--model", ws / "model")
    first = strict_json(run(capsys, "drift", *where, "--set", "0.05", "--panel", "8", "--json")[1])
    code, out, _ = run(capsys, "drift", *where, "--set", "2.5", "--kind", "loss", "--keep-baseline", "--json")
    kept = strict_json(out)
    assert code == 0 and kept["budget"] == 2.5 and kept["kind"] == "loss"
    assert (kept["members"], kept["baseline_model_hash"], kept["baseline_loss"]) == (
        first["members"], first["baseline_model_hash"], first["baseline_loss"])
    code, _, err = run(capsys, "drift", *where, "--set", "0.1", "--keep-baseline", "--panel", "4")
    assert code == 2 and "keeps the panel" in one_line_error(err)


def test_errors_of_the_object_store_client_are_one_line(ws, capsys, monkeypatch):
    class NoCredentialsError(Exception):  # as botocore raises it: not an OSError
        __module__ = "botocore.exceptions"

    def no_credentials(*args, **kwargs):
        raise NoCredentialsError("Unable to locate credentials")

    monkeypatch.setattr(GradStore, "open", no_credentials)
    code, _, err = run(capsys, "info", "s3://bucket/store")
    assert code == 2 and "the object store failed: NoCredentialsError: Unable to locate credentials" in \
        one_line_error(err)


def test_devices_are_checked_before_use():
    from gradstore_unlearn.train import check_device

    assert check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        check_device("gpu0")
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            check_device("cuda:0")


def test_corpus_counts_the_documents_of_each_file_it_writes(tmp_path, capsys):
    code, out, _ = run(capsys, "corpus", "--out", tmp_path / "c", "--size", "tiny")
    assert code == 0
    shown = dict(line.split() for line in out.strip().splitlines()[1:])
    for name, count in shown.items():
        assert int(count) == len((tmp_path / "c" / name).read_text().splitlines()), name
