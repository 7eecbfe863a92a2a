"""Every endpoint through a test client against a temporary store and a tiny model, error responses included."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from server_support import API_KEY, OTHER_KEY, SLOW_FORGET, build_template, copy_template, wait_job

from gradstore import GradStore
from gradstore_unlearn.drift import load_drift_budget
from gradstore_unlearn.train import load_model
from gradstore_unlearn.unlearn import Unlearner, model_hash

V1_ROUTES = [("get", "/v1/stats", None), ("get", "/v1/examples/1", None), ("post", "/v1/influence", {"id": 1}),
             ("post", "/v1/forget", {"ids": [1]}), ("get", "/v1/jobs/" + "0" * 32, None), ("get", "/v1/audit", None),
             ("get", "/v1/audit/chain", None), ("get", "/v1/drift", None)]


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "ids", "details"}
    assert body["message"]
    if code is not None:
        assert body["code"] == code, body
    return body


def forget(client, body: dict, status: int | None = None) -> dict:
    """POST /v1/forget; 202 (a new job) unless told otherwise, 200 for a dry run (answered at once)."""
    response = client.post("/v1/forget", json=body)
    expected = status if status is not None else 200 if body.get("dry_run") else 202
    assert response.status_code == expected, response.text
    return response.json()


# ------------------------------------------------------------------------------------------ health, auth
def test_healthz_needs_no_key(client):
    response = client.get("/healthz", headers={"X-API-Key": ""})
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize(("method", "path", "body"), V1_ROUTES)
def test_every_v1_route_needs_a_valid_key(client, method, path, body):
    kwargs = {"json": body} if body is not None else {}
    missing = getattr(client, method)(path, headers={"X-API-Key": ""}, **kwargs)
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("ApiKey")
    wrong = getattr(client, method)(path, headers={"X-API-Key": API_KEY[:-1] + "x"}, **kwargs)
    assert_error(wrong, 401, "unauthorized")
    assert "invalid" in wrong.json()["message"]


def test_the_key_is_checked_under_a_root_path(workspace):
    """Mounted or proxied under a prefix, the /v1 routes still need the key (routing strips the root path)."""
    from fastapi.testclient import TestClient

    from gradstore_server import create_app

    with TestClient(create_app(workspace.settings()), root_path="/api") as client:
        assert_error(client.get("/api/v1/stats"), 401, "unauthorized")
        assert client.get("/api/v1/stats", headers={"X-API-Key": API_KEY}).status_code == 200
        assert client.get("/api/healthz").status_code == 200
    for root in ("/v", "/v1/st"):  # a root path that is not a whole segment of the path strips nothing
        with TestClient(create_app(workspace.settings()), root_path=root) as client:
            assert_error(client.get("/v1/stats"), 401, "unauthorized")


def test_every_configured_key_is_accepted(client):
    assert client.get("/v1/stats", headers={"X-API-Key": OTHER_KEY}).status_code == 200
    # A bad key is refused before the body is even looked at (401, not 422 or 415), a missing one alike.
    assert client.post("/v1/forget", json={"bogus": 1}, headers={"X-API-Key": "nope"}).status_code == 401
    for headers in ({"X-API-Key": ""}, {"X-API-Key": "nope"}):
        for content_type in ("application/json", "text/plain"):
            response = client.post("/v1/forget", content=b"{bad", headers=headers | {"Content-Type": content_type})
            assert_error(response, 401, "unauthorized")


# ---------------------------------------------------------------------------------------------- stats
def test_stats(client, workspace):
    body = client.get("/v1/stats").json()
    assert body["store"]["examples"] == len(workspace.template.ids)
    assert body["store"]["dim"] == 32 and body["store"]["tombstones"] == 0
    model, _ = load_model(workspace.model)
    assert body["model"]["hash"] == model_hash(model)
    assert body["model"] | {"hash": None} == {"hash": None, "version": 0, "device": "cpu", "vocab_size": 300,
                                              "max_positions": 64, "tokenizer": True}
    assert body["jobs"] == {"queued": 0, "running": 0}


# ------------------------------------------------------------------------------------------- examples
def test_example_by_integer_and_string_id(client, workspace):
    store = GradStore.open(workspace.store, read_only=True)
    body = client.get("/v1/examples/5").json()
    assert body["id"] == 5 and body["id_type"] == "int" and body["rows"] is None
    expected = store.get(5)
    assert body["token_ids"] == expected.token_ids.tolist()
    assert body["meta"]["tokens"] == expected.meta["tokens"]
    body = client.get("/v1/examples/rec-2").json()
    assert body["id"] == "rec-2" and body["id_type"] == "str"


def test_example_rows_only_when_asked(client, workspace):
    store = GradStore.open(workspace.store, read_only=True)
    body = client.get("/v1/examples/7", params={"rows": "true"}).json()
    rows = torch.tensor(body["rows"])
    assert rows.shape == (body["n_tokens"], 32)
    assert torch.equal(rows, store.get(7).dequantized())


def test_example_id_rules(client):
    # "3" is both a string ID and (as 3) an integer ID: the string wins unless id_type says otherwise.
    assert client.get("/v1/examples/3").json()["id"] == "3"
    assert client.get("/v1/examples/3", params={"id_type": "int"}).json()["id"] == 3
    assert client.get("/v1/examples/3", params={"id_type": "str"}).json()["id"] == "3"
    assert client.get("/v1/examples/12").json()["id"] == 12  # no string "12": the integer
    assert client.get("/v1/examples/user%2F42").json()["id"] == "user/42"
    assert client.get("/v1/examples/%C3%A9mile").json()["id"] == "émile"
    body = assert_error(client.get("/v1/examples/012"), 404, "unknown_id")  # not canonical: never the int 12
    assert "'012'" in body["message"]
    assert_error(client.get("/v1/examples/12", params={"id_type": "str"}), 404, "unknown_id")
    assert_error(client.get("/v1/examples/rec-1", params={"id_type": "int"}), 404, "unknown_id")
    assert_error(client.get("/v1/examples/1", params={"id_type": "float"}), 422, "invalid_request")
    assert_error(client.get("/v1/examples/1", params={"rows": "maybe"}), 422, "invalid_request")
    assert_error(client.get("/v1/examples/" + "x" * 300), 404, "unknown_id")  # can never be an ID
    assert_error(client.get("/v1/examples/1", params={"row": "true"}), 422, "invalid_request")  # unknown param
    assert_error(client.get("/v1/examples/99999999999999999999999"), 404, "unknown_id")


def test_unknown_example_is_404_naming_it(client):
    body = assert_error(client.get("/v1/examples/no-such-person"), 404, "unknown_id")
    assert body["ids"] == ["no-such-person"] and "no-such-person" in body["message"]


def test_erased_example_is_409(client):
    job = forget(client, {"ids": [4, "rec-4"], "mode": "iterative"})
    assert wait_job(client, job["job_id"])["result"]["status"] == "forgotten"
    body = assert_error(client.get("/v1/examples/4"), 409, "erased")
    assert body["ids"] == [4]
    assert_error(client.get("/v1/examples/rec-4"), 409, "erased")


# ------------------------------------------------------------------------------------------ influence
def test_influence_by_id(client):
    body = client.post("/v1/influence", json={"id": 5, "k": 4}).json()
    assert body["query"] == {"kind": "id", "id": 5, "n_tokens": None} and body["k"] == 4
    assert len(body["results"]) == 4
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert 5 not in [r["id"] for r in body["results"]]  # the query itself is left out
    assert client.post("/v1/influence", json={"id": "user/42"}).json()["k"] == 10


def test_influence_by_text_ranks_its_own_example_first(client, workspace):
    text = workspace.template.texts["rec-3"]
    body = client.post("/v1/influence", json={"text": text, "k": 3}).json()
    assert body["query"]["kind"] == "text" and body["query"]["n_tokens"] > 10
    assert body["results"][0]["id"] == "rec-3"


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"id": 123456}, 404, "unknown_id"),
    ({"id": "nobody"}, 404, "unknown_id"),
    ({}, 422, "invalid_request"),
    ({"id": 1, "text": "both"}, 422, "invalid_request"),
    ({"id": 1, "k": 0}, 422, "invalid_request"),
    ({"id": 1, "k": 1001}, 422, "invalid_request"),
    ({"id": 1, "k": "5"}, 422, "invalid_request"),
    ({"id": 1, "k": True}, 422, "invalid_request"),
    ({"id": 1, "k": 2.0}, 422, "invalid_request"),
    ({"id": 1.0}, 422, "invalid_request"),
    ({"id": True}, 422, "invalid_request"),
    ({"id": -1}, 422, "invalid_request"),
    ({"id": 2**63}, 422, "invalid_request"),
    ({"id": ""}, 422, "invalid_request"),
    ({"id": "é" * 200}, 422, "invalid_request"),  # 200 characters, 400 UTF-8 bytes
    ({"id": 1, "extra": 1}, 422, "invalid_request"),
    ({"text": ""}, 422, "invalid_request"),
    ({"text": "x"}, 422, "invalid_input"),  # a single token has no next-token loss
    ({"text": "Alice " * 80}, 422, "text_too_long"),
    ({"text": "x" * 20_001}, 422, "invalid_request"),
])
def test_influence_errors(client, body, status, code):
    assert_error(client.post("/v1/influence", json=body), status, code)


def test_influence_on_erased_id_is_409(client, workspace):
    job = wait_job(client, forget(client, {"ids": [6], "mode": "iterative"})["job_id"])
    assert job["result"]["status"] == "forgotten"
    assert_error(client.post("/v1/influence", json={"id": 6}), 409, "erased")
    # ...and the erased example no longer turns up as an influence of anything
    ranked = client.post("/v1/influence", json={"text": workspace.template.texts[6], "k": 50}).json()["results"]
    assert 6 not in [r["id"] for r in ranked]


def test_malformed_json_and_content_types(client):
    headers = {"Content-Type": "application/json"}
    assert_error(client.post("/v1/influence", content=b'{"id": 1', headers=headers), 422)
    assert_error(client.post("/v1/influence", content=b"\xff\xfe", headers=headers), 422)
    assert_error(client.post("/v1/influence", content=b'{"text": "\\ud800 x"}', headers=headers), 422)
    assert_error(client.post("/v1/influence", content=b"[" * 100_000 + b"]" * 100_000, headers=headers), 422)
    for form in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        body = assert_error(client.post("/v1/influence", content=b'{"text": "hello world"}',
                                        headers={"Content-Type": form}), 415, "unsupported_media_type")
        assert "application/json" in body["message"]
    for json_type in ("application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"):
        assert client.post("/v1/influence", content=b'{"id": 1, "k": 1}',
                           headers={"Content-Type": json_type}).status_code == 200, json_type
    assert_error(client.post("/v1/influence", content=b"NaN", headers=headers), 422)


def test_body_size_limit(client):
    big = json.dumps({"ids": list(range(300_000))}).encode()  # ~2 MB, over the 1 MiB default
    assert_error(client.post("/v1/forget", content=big, headers={"Content-Type": "application/json"}), 413,
                 "body_too_large")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * 50_000

    assert_error(client.post("/v1/forget", content=chunks(), headers={"Content-Type": "application/json"}), 413,
                 "body_too_large")


# --------------------------------------------------------------------------------------------- forget
def test_forget_job_lifecycle(client, workspace):
    before = client.get("/v1/stats").json()
    response = client.post("/v1/forget", json={"ids": [10, "rec-5"], "mode": "iterative", "request_id": "dsr-1"})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['job_id']}"
    assert job["request_id"] == "dsr-1" and job["status"] in ("queued", "running") and job["ids"] == [10, "rec-5"]
    assert job["n_ids"] == 2 and len(job["id_hashes"]) == 2
    done = wait_job(client, job["job_id"])
    assert done["status"] == "completed" and done["ids"] is None and done["attempts"] == 1
    result = done["result"]
    assert result["n_ids"] == 2 and result["model_hash_before"] == before["model"]["hash"]
    after = client.get("/v1/stats").json()
    model, _ = load_model(workspace.model)
    assert after["model"]["hash"] == model_hash(model)  # what is served is what is on disk
    assert result["status"] == "forgotten"
    assert after["model"]["hash"] == result["model_hash_after"] and after["model"]["version"] == 1
    assert after["store"]["examples"] == before["store"]["examples"] - 2
    records = client.get("/v1/audit").json()["items"]
    assert records[-1]["request_id"] == "dsr-1"
    assert sorted(records[-1]["id_hashes"]) == sorted(done["id_hashes"])
    chain = client.get("/v1/audit/chain").json()
    assert chain["whole"] and chain["problems"] == [] and chain["pending"] == [] and chain["carried"] == 0
    assert chain["first_hash"] == chain["trained_hash"] == before["model"]["hash"]
    assert chain["last_hash"] == chain["model_hash"] == after["model"]["hash"]


def test_repeated_request_id_returns_the_original_job(client):
    first = forget(client, {"ids": [11], "request_id": "dsr-2"})
    wait_job(client, first["job_id"])
    again = client.post("/v1/forget", json={"ids": [11], "request_id": "dsr-2"})
    assert again.status_code == 200 and again.json()["job_id"] == first["job_id"]
    assert again.headers["location"] == f"/v1/jobs/{first['job_id']}"
    other = client.post("/v1/forget", json={"ids": [12], "request_id": "dsr-2"})
    assert_error(other, 409, "request_id_conflict")


def test_a_request_id_names_a_set_of_ids_and_a_dry_run_claims_none(client):
    preview = forget(client, {"ids": [19, 20], "request_id": "dsr-3", "dry_run": True})
    assert preview["status"] == "completed" and preview["result"]["status"] == "dry_run"
    job = forget(client, {"ids": [20, 19], "request_id": "dsr-3"})  # 202: the preview did not claim the id
    assert job["job_id"] != preview["job_id"]
    assert wait_job(client, job["job_id"])["status"] == "completed"
    for ids in ([19, 20], [20, 19, 19]):  # the same examples, in any order, repeated or not
        again = client.post("/v1/forget", json={"ids": ids, "request_id": "dsr-3"})
        assert again.status_code == 200 and again.json()["job_id"] == job["job_id"], ids
    for body in ({"ids": [19, "20"]}, {"ids": [19]}, {"ids": [19, 20], "mode": "iterative"}):
        refused = client.post("/v1/forget", json={**body, "request_id": "dsr-3"})
        assert_error(refused, 409, "request_id_conflict")


def test_a_request_id_claimed_meanwhile_elsewhere_wins(client, workspace, monkeypatch):
    """Another server on the store may claim a request id between our look-up and our claim: its job stands,
    ours is dropped before it can run (the same request gets that job, another one 409)."""
    first = forget(client, {"ids": [21], "request_id": "dsr-4"})
    wait_job(client, first["job_id"])
    manager = client.app.state.jobs
    real = manager._job_for_request
    calls = []

    def not_claimed_yet(request_id):
        calls.append(request_id)
        return None if len(calls) == 1 else real(request_id)

    monkeypatch.setattr(manager, "_job_for_request", not_claimed_yet)
    other = client.post("/v1/forget", json={"ids": [22], "request_id": "dsr-4"})
    assert_error(other, 409, "request_id_conflict")
    calls.clear()
    same = client.post("/v1/forget", json={"ids": [21], "request_id": "dsr-4"})
    assert same.status_code == 200 and same.json()["job_id"] == first["job_id"]
    store = GradStore.open(workspace.store, read_only=True)
    assert [n for n in store.objects.list_dir("jobs") if n.endswith(".json")] == [f"{first['job_id']}.json"]
    time.sleep(0.2)
    assert client.get("/v1/examples/22").status_code == 200
    assert client.get("/v1/stats").json()["jobs"] == {"queued": 0, "running": 0}


def test_forget_already_erased(client):
    done = wait_job(client, forget(client, {"ids": [13, 14], "mode": "iterative"})["job_id"])
    assert done["result"]["status"] == "forgotten"
    examples = done["result"]["examples"]  # per example, in request order, without IDs
    assert len(examples) == 2 and all(e["loss_after"] > e["loss_before"] and e["tokens"] > 0 for e in examples)
    body = assert_error(client.post("/v1/forget", json={"ids": [14, 13]}), 409, "already_erased")
    assert body["ids"] == [14, 13]
    # A mix forgets the live ones and counts the rest.
    mixed = forget(client, {"ids": [15, 13], "dry_run": True})
    assert mixed["result"]["n_already_forgotten"] == 1 and mixed["result"]["n_ids"] == 1
    assert mixed["ids"] == [15, 13]  # request order, erased or not


def test_forget_unknown_id_is_404_naming_it(client):
    body = assert_error(client.post("/v1/forget", json={"ids": [1, "ghost", 2, "spook"]}), 404, "unknown_id")
    assert body["ids"] == ["ghost", "spook"] and "'ghost', 'spook'" in body["message"]
    assert client.get("/v1/stats").json()["jobs"] == {"queued": 0, "running": 0}


def test_forget_dry_run_changes_nothing(client, workspace):
    before = client.get("/v1/stats").json()
    store = GradStore.open(workspace.store, read_only=True)
    jobs_before = store.objects.list_dir("jobs")
    response = client.post("/v1/forget", json={"ids": ["rec-6", 16, 16], "dry_run": True})
    assert response.status_code == 200 and "location" not in response.headers  # answered now, nothing to poll
    job = response.json()
    assert job["status"] == "completed" and job["dry_run"] and job["result"]["status"] == "dry_run"
    assert job["ids"] == ["rec-6", 16]  # named in this response only, in request order
    assert store.objects.list_dir("jobs") == jobs_before  # a preview is not kept
    assert_error(client.get(f"/v1/jobs/{job['job_id']}"), 404, "unknown_job")
    after = client.get("/v1/stats").json()
    assert after["model"] == before["model"] and after["store"]["examples"] == before["store"]["examples"]


def test_forget_by_text(client, workspace):
    text = workspace.template.texts["rec-7"]
    dry = forget(client, {"text": text, "dry_run": True, "threshold": 0.9})
    assert [m["id"] for m in dry["matches"]] == ["rec-7"] and dry["matches"][0]["jaccard"] == 1.0
    job = forget(client, {"text": text, "threshold": 0.9, "metric": "containment", "mode": "iterative"})
    assert job["source"] == "text" and job["matches"][0]["id"] == "rec-7"
    done = wait_job(client, job["job_id"])
    assert done["status"] == "completed" and done["result"]["n_ids"] == 1
    body = assert_error(client.post("/v1/forget", json={"text": "Zygmunt Quillfeather of Atlantis"}), 404, "no_match")
    assert "no stored example" in body["message"]
    # Matching needs no model context: a long document naming someone still finds their record.
    long_text = " ".join(["Lorem ipsum dolor sit amet."] * 40 + [workspace.template.texts["rec-0"]])
    found = forget(client, {"text": long_text, "metric": "containment", "threshold": 0.02, "dry_run": True})
    assert "rec-0" in [m["id"] for m in found["matches"]]


@pytest.mark.parametrize("body", [
    {}, {"ids": []}, {"ids": 5}, {"ids": ["5", 5.5]}, {"ids": [True]}, {"ids": [None]}, {"ids": [[1]]},
    {"ids": [1], "mode": "fast"}, {"ids": [1], "dry_run": "yes"}, {"ids": [1], "dry_run": 1},
    {"ids": [1], "request_id": "has space"}, {"ids": [1], "request_id": ""}, {"ids": [1], "request_id": "x" * 129},
    {"ids": [1], "request_id": 7}, {"ids": [1], "unknown": True}, {"ids": [1], "text": "both"},
    {"ids": list(range(10_001))}, {"text": "a b", "threshold": 1.5}, {"text": "a b", "threshold": "0.5"},
    {"text": "a b", "metric": "cosine"}, {"text": ""}, {"text": "a b", "threshold": 0},
])
def test_forget_rejects_malformed_requests(client, body):
    assert_error(client.post("/v1/forget", json=body), 422, "invalid_request")


@pytest.mark.parametrize(("path", "body", "where", "says"), [
    ("/v1/forget", {"text": "Alice", "threshold": 0}, ["body", "ForgetByText", "threshold"], "greater than 0"),
    ("/v1/forget", {"text": "Alice", "metric": "cosine"}, ["body", "ForgetByText", "metric"], "jaccard"),
    ("/v1/forget", {"ids": [1.5]}, ["body", "ForgetByIds", "ids", 0], ""),
    ("/v1/forget", {"ids": [1], "text": "both"}, ["body", "ForgetByIds", "text"], "Extra inputs"),
    ("/v1/forget", {"mode": "iterative"}, ["body"], "needs `ids` (a list of IDs) or `text`"),
    ("/v1/influence", {"text": "Alice", "k": 0}, ["body", "InfluenceByText", "k"], "greater than or equal to 1"),
    ("/v1/influence", {"id": 1, "k": 0}, ["body", "InfluenceById", "k"], "greater than or equal to 1"),
    ("/v1/influence", [1], ["body"], "needs `id` (a stored example) or `text`"),
])
def test_validation_errors_name_the_real_problem(client, path, body, where, says):
    """A body is validated against the one schema its `ids` / `id` / `text` field picks, so that its errors are
    about it (not "ids: field required" for a by-text body with a bad threshold)."""
    error = assert_error(client.post(path, json=body), 422, "invalid_request")
    assert error["details"][0]["loc"][: len(where)] == where
    assert all(d["loc"][:2] == where[:2] for d in error["details"]), error["details"]
    assert says in error["message"] and error["message"].startswith(".".join(map(str, where[:3])))


def test_pending_job_records_hold_ids_finished_ones_only_hashes(client, workspace):
    job = forget(client, {"ids": ["rec-8"], "mode": "iterative"})
    wait_job(client, job["job_id"])
    forget(client, {"ids": ["user/42"], "dry_run": True})
    store = GradStore.open(workspace.store, read_only=True)
    for name in store.objects.list_dir("jobs"):
        if name.endswith(".json"):
            text = store.objects.read(f"jobs/{name}").decode()
            assert "rec-8" not in text and "user/42" not in text
            assert json.loads(text)["status"] == "completed"


# ----------------------------------------------------------------------------------------------- jobs
def test_unknown_job_is_404(client):
    body = assert_error(client.get("/v1/jobs/" + "a" * 32), 404, "unknown_job")
    assert "a" * 32 in body["message"]
    assert_error(client.get("/v1/jobs/..%2Fgradstore"), 404)
    assert_error(client.get("/v1/jobs/by-request"), 404, "unknown_job")


# ---------------------------------------------------------------------------------------------- audit
def test_audit_paging(client):
    start = client.get("/v1/audit").json()
    # Training recorded the model it ended with: the one record before any forget.
    assert [r["kind"] for r in start["items"]] == ["trained"] and start["total"] == 1
    assert start["items"][0]["model_hash"] == client.get("/v1/stats").json()["model"]["hash"]
    results = []
    for ids in ([17], [18], [19]):
        results.append(wait_job(client, forget(client, {"ids": ids, "mode": "iterative"})["job_id"]))
    assert all(j["result"]["status"] == "forgotten" for j in results)
    page = client.get("/v1/audit", params={"limit": 2}).json()
    assert page["total"] == 4 and len(page["items"]) == 2 and page["next_offset"] == 2
    rest = client.get("/v1/audit", params={"offset": 2, "limit": 2}).json()
    assert len(rest["items"]) == 2 and rest["next_offset"] is None
    assert [r["request_id"] for r in page["items"][1:] + rest["items"]] == [j["request_id"] for j in results]
    for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"offset": "x"}, {"page": 2}):
        assert_error(client.get("/v1/audit", params=params), 422, "invalid_request")


# -------------------------------------------------------------------------------------------- openapi
def test_openapi_documents_every_response(client):
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key", "description": "one of the keys in GRADSTORE_API_KEYS"}
    expected = {
        ("get", "/healthz"): {"200"},
        ("get", "/v1/stats"): {"200", "401", "500", "503"},
        ("get", "/v1/examples/{example_id}"): {"200", "401", "404", "409", "422", "500", "503"},
        ("post", "/v1/influence"): {"200", "401", "404", "409", "413", "415", "422", "500", "503"},
        ("post", "/v1/forget"): {"200", "202", "401", "404", "409", "413", "415", "422", "500", "503"},
        ("get", "/v1/jobs/{job_id}"): {"200", "401", "404", "422", "500", "503"},
        ("get", "/v1/audit"): {"200", "401", "422", "500", "503"},
        ("get", "/v1/audit/chain"): {"200", "401", "500", "503"},
        ("get", "/v1/drift"): {"200", "401", "409", "500", "503"},
    }
    found = {(m, p): set(op["responses"]) for p, ops in schema["paths"].items() for m, op in ops.items()}
    assert found == expected
    # every error is documented with the one error shape (FastAPI's own 422 body never appears)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for ops in schema["paths"].values():
        for op in ops.values():
            for status, response in op["responses"].items():
                if status >= "400":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorResponse"
    for (_, path), _codes in expected.items():
        if path != "/healthz":
            assert all(op.get("security") for op in schema["paths"][path].values())


def test_a_full_queue_is_503(workspace):
    from fastapi.testclient import TestClient

    from gradstore_server import create_app

    settings = workspace.settings(max_queued_jobs=1, forget_config=SLOW_FORGET)
    with TestClient(create_app(settings), headers={"X-API-Key": API_KEY}) as client:
        running = forget(client, {"ids": [24], "mode": "iterative"})
        while client.get(f"/v1/jobs/{running['job_id']}").json()["status"] == "queued":
            time.sleep(0.01)
        waiting = forget(client, {"ids": [25]})
        body = assert_error(client.post("/v1/forget", json={"ids": [26]}), 503, "queue_full")
        assert "retry" in body["message"]
        assert client.post("/v1/forget", json={"ids": [26], "dry_run": True}).status_code == 200  # never queued
        for job in (running, waiting):
            assert wait_job(client, job["job_id"])["status"] == "completed"
        assert client.post("/v1/forget", json={"ids": [26]}).status_code == 202


# ------------------------------------------------------------------------------------------- logging
def test_error_logs_name_the_route_not_the_id(client, monkeypatch, caplog):
    from gradstore import GradStoreError

    def fails(*args, **kwargs):
        raise GradStoreError("disk trouble")

    monkeypatch.setattr(client.app.state.engine, "example", fails)
    with caplog.at_level(logging.ERROR, logger="gradstore_server"):
        assert_error(client.get("/v1/examples/rec-secret-7"), 500, "store_error")
    assert "/v1/examples/{example_id}" in caplog.text and "rec-secret-7" not in caplog.text


# ----------------------------------------------------------------------------------- capture policy all
@pytest.fixture(scope="module")
def all_epochs(tmp_path_factory):
    return build_template(tmp_path_factory.mktemp("all-epochs"), capture_policy="all")


def test_later_epoch_records_are_not_examples(all_epochs, tmp_path, capsys):
    """Under capture policy `all` the store holds `<id>@epochN` copies of each example: text influence (here)
    and `gradstore find` rank examples, as the library's own influence and fuzzy index do."""
    from fastapi.testclient import TestClient

    from gradstore_server import create_app
    from gradstore_unlearn import cli
    from gradstore_unlearn.capture import is_later_epoch_record

    ws = copy_template(all_epochs, tmp_path)
    assert any(is_later_epoch_record(k) for k in GradStore.open(ws.store, read_only=True).ids())
    text = all_epochs.texts[3]
    with TestClient(create_app(ws.settings()), headers={"X-API-Key": API_KEY}) as client:
        ids = [r["id"] for r in client.post("/v1/influence", json={"text": text, "k": 30}).json()["results"]]
    assert len(ids) == 30 and not any(is_later_epoch_record(i) for i in ids)
    assert cli.main(["find", "--store", str(ws.store), "--model", str(ws.model), "--text", text,
                     "--threshold", "0.05", "--limit", "100", "--json"]) == 0
    found = [m["id"] for m in json.loads(capsys.readouterr().out)]
    assert found[0] == 3 and len(found) == len(set(found))
    assert not any(is_later_epoch_record(i) for i in found)


# ---------------------------------------------------------------------------------------------- drift
def test_the_drift_budget_set_on_the_store_is_read_and_honoured(client, workspace):
    assert client.get("/v1/drift").json() == {"drift": None}
    # Set from the command line's library call on the same store and the weights the server serves.
    model, tokenizer = load_model(workspace.model)
    store = GradStore.open(workspace.store)
    Unlearner(model, store, tokenizer=tokenizer, model_dir=workspace.model
              ).set_drift_budget(5.0, kind="loss", panel=8)  # as generous as the tests' guard: it commits
    in_panel = store.id_hash(10) in load_drift_budget(store).panel
    drift = client.get("/v1/drift").json()["drift"]
    assert drift["budget"] == 5.0 and drift["kind"] == "loss" and drift["members"] == 8
    # No change, up to the order of a float sum (the baseline is a mean of per-member losses, the reading a mean
    # over the members in the store's order).
    assert abs(drift["change"]) < 1e-12
    assert drift["baseline_model_hash"] == client.get("/v1/stats").json()["model"]["hash"]
    done = wait_job(client, forget(client, {"ids": [10], "mode": "iterative"})["job_id"])
    result = done["result"]
    assert result["status"] == "forgotten"
    assert result["drift"]["before"]["change"] == 0 and result["drift"]["after"]["budget"] == 5.0
    assert client.get("/v1/audit").json()["items"][-1]["drift"] == result["drift"]
    assert client.get("/v1/drift").json()["drift"]["members"] == 8 - in_panel


def test_a_drift_reading_waits_for_a_gradient_taken_beside_it(client, workspace):
    """A gradient (influence by text) hooks the shared model's embedding; a forward without grad through that hook
    would fail, so the reading takes the same lock."""
    import threading

    model, tokenizer = load_model(workspace.model)
    Unlearner(model, GradStore.open(workspace.store), tokenizer=tokenizer, model_dir=workspace.model
              ).set_drift_budget(0.05, panel=4)
    engine = client.app.state.engine
    answers = []
    with engine._autograd:
        reader = threading.Thread(target=lambda: answers.append(client.get("/v1/drift")))
        reader.start()
        reader.join(0.5)
        assert answers == []  # still waiting for the gradient's lock
    reader.join(30)
    assert answers[0].status_code == 200 and answers[0].json()["drift"]["members"] == 4


def test_a_drift_budget_with_no_panel_example_left_is_a_conflict(workspace):
    from fastapi.testclient import TestClient

    from gradstore_server import create_app

    model, tokenizer = load_model(workspace.model)
    store = GradStore.open(workspace.store)
    Unlearner(model, store, tokenizer=tokenizer, model_dir=workspace.model).set_drift_budget(0.05, panel=1)
    (member,) = [i for i in workspace.template.ids if store.id_hash(i) in load_drift_budget(store).panel]
    # Erased outside any forget (a forget never takes the last member: it is refused): the panel still names it,
    # and no stored example answers to it.
    store.erase([member])
    with TestClient(create_app(workspace.settings()), headers={"X-API-Key": API_KEY}) as client:
        assert_error(client.get("/v1/drift"), 409, "drift_unmeasurable")
