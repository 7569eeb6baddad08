"""Relevance feedback over the real sample index (ImageNet VGG-16 embeddings of the sample export): votes stored in
the catalog with who/when/query/hit/score/model and in the audit log, bad votes refused with a reason, Rocchio
refinement moving a 👍 hit up and a 👎 hit down, and the CSV export round-tripping."""

import csv
import json
import shutil
import sqlite3
import time

import numpy as np
import pytest

from medsim.cli import main
from medsim.feedback import ROCCHIO, FeedbackStore, Vote, net_votes, read_csv, refine, write_csv
from medsim.index import CATALOG, CaseIndex

TOKEN = "feedback-test-token-0123456789"


@pytest.fixture(scope="module")
def index_copy(sample_index, tmp_path_factory):
    """A copy of the session's sample index (votes write to its catalog)."""
    path = tmp_path_factory.mktemp("feedback") / "index"
    shutil.copytree(sample_index[0], path)
    return path


@pytest.fixture(scope="module")
def service(index_copy, tmp_path_factory):
    from medsim.server.settings import Settings
    from medsim.server.state import Service

    service = Service(Settings(index=index_copy, cache_dir=tmp_path_factory.mktemp("cache"), warm_up=False,
                               index_check_interval=0))
    yield service
    service.close()


@pytest.fixture
def make_client(index_copy, service):
    from medsim.server import Settings, create_app

    def make(**overrides):
        settings = Settings(index=index_copy, cache_dir=service.cache_dir, warm_up=False, index_check_interval=0,
                            **overrides)
        return create_app(settings, service=service).test_client()

    return make


@pytest.fixture(scope="module")
def query(index_copy):
    """An indexed frontal case of the sample, and the others (image ids)."""
    with CaseIndex.open(index_copy) as index:
        cases = [c for c in index.cases() if c.view in ("AP", "PA")]
    return cases[0]


def _similar(client, sop_uid, path="/api/v1/similar", headers=None):
    response = client.post(path, json={"sop_uid": sop_uid, "k": 12, "threshold": "none", "group_by": "image"},
                           headers=headers or {})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _rows(index_path):
    with sqlite3.connect(index_path / CATALOG) as db:
        db.row_factory = sqlite3.Row
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name='feedback'").fetchone():
            return []
        return [dict(r) for r in db.execute("SELECT * FROM feedback ORDER BY id")]


def _clear(index_path):
    """No votes (the first vote creates the table)."""
    with sqlite3.connect(index_path / CATALOG) as db:
        db.execute("DROP TABLE IF EXISTS feedback")


def test_votes_are_stored_with_who_when_score_and_model_and_audited(make_client, index_copy, query, tmp_path):
    _clear(index_copy)
    log = tmp_path / "audit.jsonl"
    client = make_client(tokens={"dr-a": TOKEN}, audit_log=log)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    hits = _similar(client, query.sop_uid, headers=auth)["results"]
    fingerprint = CaseIndex.open(index_copy).model_fingerprint
    before = time.time()
    up = client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hits[2]["sop_uid"], "vote": "up"},
                     headers=auth)
    down = client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hits[0]["sop_uid"], "vote": "down"},
                       headers=auth)
    assert up.status_code == 201 and down.status_code == 201, (up.get_json(), down.get_json())
    assert down.get_json()["up"] == 1 and down.get_json()["down"] == 1 and down.get_json()["user"] == "dr-a"

    rows = _rows(index_copy)
    assert [(r["hit_sop_uid"], r["vote"]) for r in rows] == [(hits[2]["sop_uid"], 1), (hits[0]["sop_uid"], -1)]
    for row, hit in zip(rows, (hits[2], hits[0])):
        assert row["user"] == "dr-a" and row["query_sop_uid"] == query.sop_uid
        assert before - 1 <= row["voted_at"] <= time.time() + 1
        assert row["score"] == pytest.approx(hit["score"], abs=1e-5)  # the score the panel showed
        assert row["model_fingerprint"] == fingerprint

    # a second vote of the same user on the same hit replaces the first; "none" withdraws it
    client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hits[2]["sop_uid"], "vote": "down"},
                headers=auth)
    assert [r["vote"] for r in _rows(index_copy)] == [-1, -1]
    gone = client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hits[2]["sop_uid"], "vote": "none"},
                       headers=auth)
    assert gone.status_code == 200 and gone.get_json()["down"] == 1
    assert [r["hit_sop_uid"] for r in _rows(index_copy)] == [hits[0]["sop_uid"]]

    listed = client.get(f"/api/v1/feedback?query={query.sop_uid}", headers=auth).get_json()
    assert [(v["hit_sop_uid"], v["vote"], v["user"]) for v in listed["votes"]] == [(hits[0]["sop_uid"], "down",
                                                                                     "dr-a")]
    assert listed["up"] == 0 and listed["down"] == 1

    records = [json.loads(line) for line in log.read_text().splitlines()]
    votes = [r for r in records if r["path"] == "/api/v1/feedback" and r["method"] == "POST"]
    assert [(r["hit"], r["vote"], r["status"]) for r in votes] == [
        (hits[2]["sop_uid"], "up", 201), (hits[0]["sop_uid"], "down", 201), (hits[2]["sop_uid"], "down", 201),
        (hits[2]["sop_uid"], "none", 200)]
    assert all(r["client"] == "dr-a" and r["voter"] == "dr-a" and r["query"] == query.sop_uid for r in votes)
    assert votes[0]["score"] == pytest.approx(hits[2]["score"], abs=1e-5)
    assert TOKEN not in log.read_text()


def test_anonymous_votes_without_tokens(make_client, index_copy, query):
    _clear(index_copy)
    client = make_client()
    hit = _similar(client, query.sop_uid)["results"][1]["sop_uid"]
    response = client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hit, "vote": "up"})
    assert response.status_code == 201 and response.get_json()["user"] == "anonymous"
    # a front end that authenticates (REMOTE_USER from the WSGI server, e.g. behind SSO) names the voter
    other = _similar(client, query.sop_uid)["results"][2]["sop_uid"]
    named = client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": other, "vote": "down"},
                        environ_overrides={"REMOTE_USER": "jdoe"})
    assert named.status_code == 201 and named.get_json()["user"] == "jdoe"
    assert [(r["user"], r["vote"]) for r in _rows(index_copy)] == [("anonymous", 1), ("jdoe", -1)]


@pytest.mark.parametrize("body, status, code", [
    ({"query": "1.2.3.4.5", "hit": "HIT", "vote": "up"}, 404, "not-indexed"),  # unknown query, no PACS to ask
    ({"query": "QUERY", "hit": "1.2.3.4.5", "vote": "up"}, 404, "not-indexed"),  # unknown hit
    ({"query": "QUERY", "hit": "HIT", "vote": "maybe"}, 400, "invalid-vote"),
    ({"query": "QUERY", "hit": "HIT", "vote": 1}, 400, "invalid-vote"),
    ({"query": "QUERY", "hit": "HIT"}, 400, "invalid-vote"),
    ({"query": "QUERY", "hit": "x/../y", "vote": "up"}, 400, "invalid-uid"),
    ({"hit": "HIT", "vote": "up"}, 400, "bad-request"),
    ({"query": "QUERY", "hit": "QUERY", "vote": "up"}, 400, "bad-request"),
    ({"query": "QUERY", "hit": "HIT", "vote": "up", "user": "someone-else"}, 400, "unknown-field"),
])
def test_bad_votes_get_a_reason_and_store_nothing(make_client, index_copy, query, body, status, code):
    _clear(index_copy)
    client = make_client()
    hit = _similar(client, query.sop_uid)["results"][0]["sop_uid"]
    body = {k: {"QUERY": query.sop_uid, "HIT": hit}.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    response = client.post("/api/v1/feedback", json=body)
    assert response.status_code == status and response.get_json()["error"]["code"] == code, response.get_json()
    assert response.get_json()["error"]["message"]
    assert _rows(index_copy) == []


def test_other_bad_requests(make_client, index_copy, query):
    client = make_client()
    assert client.post("/api/v1/feedback", data="vote=up").status_code == 415
    assert client.post("/api/v1/feedback", data="{", content_type="application/json").status_code == 400
    assert client.get("/api/v1/feedback").status_code == 400
    assert client.get("/api/v1/feedback?query=abc").status_code == 400
    assert client.get(f"/api/v1/feedback?query={query.sop_uid}&user=x").status_code == 400


def test_a_read_only_index_refuses_votes(make_client, index_copy, query):
    _clear(index_copy)
    client = make_client(feedback=False)
    hit = _similar(client, query.sop_uid)["results"][0]["sop_uid"]
    response = client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hit, "vote": "up"})
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "read-only-index"
    assert _rows(index_copy) == []


def test_a_catalog_that_cannot_be_written_refuses_votes(sample_index, tmp_path):
    """mode=ro stands in for a read-only file system (tests run as root, so file permissions would not)."""
    from medsim.feedback import FeedbackError

    path = tmp_path / "index"
    shutil.copytree(sample_index[0], path)
    store = FeedbackStore(path)
    store._connect = lambda writable, connect=store._connect: connect(False)  # every connection read-only
    with pytest.raises(FeedbackError, match="read-only"):
        store.vote(user="u", query_sop_uid="1.2", hit_sop_uid="1.3", vote="up", score=0.5, model_fingerprint="f")


def _rank(results, sop_uid):
    return [r["sop_uid"] for r in results].index(sop_uid)


def test_refine_moves_a_thumbs_up_hit_up_and_a_thumbs_down_hit_down(make_client, index_copy, query):
    _clear(index_copy)
    client = make_client()
    before = _similar(client, query.sop_uid)["results"]
    liked, disliked = before[5]["sop_uid"], before[0]["sop_uid"]
    for hit, vote in ((liked, "up"), (disliked, "down")):
        assert client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hit, "vote": vote}).status_code \
            == 201
    answer = _similar(client, query.sop_uid, path="/api/v1/feedback/refine")
    assert answer["refined"] == {"up": 1, "down": 1, "skipped": 0, "alpha": ROCCHIO.alpha, "beta": ROCCHIO.beta,
                                 "gamma": ROCCHIO.gamma}
    after = answer["results"]
    assert _rank(after, liked) < 5, [r["sop_uid"] for r in after]
    assert _rank(after, disliked) > 0
    assert query.sop_uid not in [r["sop_uid"] for r in after]
    # the scores are cosines to the refined query vector, which Rocchio builds from the stored embeddings
    with CaseIndex.open(index_copy) as index:
        q, up, down = index.vector(query.sop_uid), index.vector(liked), index.vector(disliked)
        expected = ROCCHIO.alpha * q + ROCCHIO.beta * up - ROCCHIO.gamma * down
        expected /= np.linalg.norm(expected)
        for row in after[:3]:
            assert row["score"] == pytest.approx(float(expected @ index.vector(row["sop_uid"])), abs=1e-4)
    # without votes the refined query is the query
    _clear(index_copy)
    plain = _similar(client, query.sop_uid, path="/api/v1/feedback/refine")
    assert plain["refined"]["up"] == 0 and [r["sop_uid"] for r in plain["results"]] == [r["sop_uid"] for r in before]


def test_rocchio_and_net_votes():
    q = np.array([1.0, 0.0, 0.0], np.float32)
    votes = [Vote(1.0, "a", "q", "h1", 1, 0.5, "f"), Vote(2.0, "b", "q", "h1", -1, 0.5, "f"),
             Vote(3.0, "a", "q", "h2", 1, 0.4, "f"), Vote(4.0, "a", "q", "h3", -1, 0.3, "f")]
    assert net_votes(votes) == (["h2"], ["h3"])  # h1: one up, one down: no vote
    vectors = {"h2": np.array([0.0, 1.0, 0.0], np.float32), "h3": np.array([0.0, 0.0, 1.0], np.float32)}
    result = refine(q, votes, vectors.get)
    assert (result.up, result.down, result.skipped) == (1, 1, 0)
    assert np.linalg.norm(result.vector) == pytest.approx(1.0)
    assert result.vector[1] > 0 > result.vector[2]
    assert refine(q, votes + [Vote(5.0, "a", "q", "gone", 1, 0.1, "f")], vectors.get).skipped == 1


def test_csv_export_round_trips(make_client, index_copy, query, tmp_path, capsys):
    _clear(index_copy)
    client = make_client()
    hits = _similar(client, query.sop_uid)["results"]
    for hit, vote in ((hits[1], "up"), (hits[3], "down"), (hits[4], "up")):
        client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hit["sop_uid"], "vote": vote})
    out = tmp_path / "votes.csv"
    assert main(["feedback", "export", str(index_copy), "--out", str(out)]) == 0
    assert "wrote 3 votes (2 up, 1 down) on the hits of 1 queries" in capsys.readouterr().out
    stored = FeedbackStore(index_copy).votes()
    back = read_csv(out)
    assert len(back) == 3
    for a, b in zip(stored, back):
        assert a.voted_at == pytest.approx(b.voted_at, abs=1e-5)
        assert (a.user, a.query_sop_uid, a.hit_sop_uid, a.vote, a.score, a.model_fingerprint) == (
            b.user, b.query_sop_uid, b.hit_sop_uid, b.vote, b.score, b.model_fingerprint)
    again = tmp_path / "again.csv"
    write_csv(back, again)
    assert again.read_text() == out.read_text()
    with open(out, newline="") as fh:
        header = next(csv.reader(fh))
    assert "patient" not in ",".join(header) and "path" not in ",".join(header)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["feedback", "export", str(tmp_path), "--out", str(tmp_path / "x.csv")]) == 2
    assert "not a medsim index" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    from medsim.feedback import FeedbackError

    with pytest.raises(FeedbackError, match="not a feedback export"):
        read_csv(bad)


# ---- the OpenAPI document describes these routes (schemathesis, as tests/test_api_fuzz.py, bounded) ----------------

FUZZ_OPERATIONS = ("postFeedback", "getFeedback", "refineSimilar")


@pytest.mark.parametrize("operation_id", FUZZ_OPERATIONS)
@pytest.mark.parametrize("positive", [True, False], ids=["valid", "invalid"])
def test_feedback_routes_match_the_openapi_document(make_client, operation_id, positive):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    app = make_client(tokens={"fuzz": TOKEN}).application
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.yaml", app)
    schema.config.generation.update(with_security_parameters=False)
    found = {r.ok().definition.raw.get("operationId"): r.ok() for r in schema.get_all_operations()}
    mode = GenerationMode.POSITIVE if positive else GenerationMode.NEGATIVE
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    seen = []

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=found[operation_id].as_strategy(generation_mode=mode))
    def run(case):
        seen.append(case.call_and_validate(checks=checks, headers={"Authorization": f"Bearer {TOKEN}"}).status_code)

    run()
    assert seen


def test_real_answers_match_the_openapi_document(make_client, index_copy, query):
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

    _clear(index_copy)
    client = make_client()
    hit = _similar(client, query.sop_uid)["results"][1]["sop_uid"]
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.yaml", client.application)
    found = {r.ok().definition.raw.get("operationId"): r.ok() for r in schema.get_all_operations()}
    checks = [status_code_conformance, response_schema_conformance]
    for operation_id, kwargs, status in (
            ("postFeedback", {"body": {"query": query.sop_uid, "hit": hit, "vote": "up"}}, 201),
            ("getFeedback", {"query": {"query": query.sop_uid}}, 200),
            ("refineSimilar", {"body": {"sop_uid": query.sop_uid, "k": 3, "threshold": "none"}}, 200),
            ("postFeedback", {"body": {"query": query.sop_uid, "hit": hit, "vote": "none"}}, 200)):
        case = found[operation_id].Case(media_type="application/json" if "body" in kwargs else None, **kwargs)
        assert case.call_and_validate(checks=checks).status_code == status, operation_id


def test_a_vote_waits_for_a_writer_then_answers_503_busy(make_client, index_copy, query):
    """build-index holding the catalog's write lock longer than a vote waits (5 s): 503 with Retry-After."""
    from medsim.feedback import BUSY_TIMEOUT_S

    _clear(index_copy)
    client = make_client()
    hit = _similar(client, query.sop_uid)["results"][0]["sop_uid"]
    writer = sqlite3.connect(index_copy / CATALOG, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # what a build-index batch holds while it commits
    try:
        started = time.monotonic()
        busy = client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hit, "vote": "up"})
        assert time.monotonic() - started >= BUSY_TIMEOUT_S * 0.9
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert busy.status_code == 503 and busy.get_json()["error"]["code"] == "busy" and busy.headers["Retry-After"]
    assert _rows(index_copy) == []
    assert client.post("/api/v1/feedback", json={"query": query.sop_uid, "hit": hit, "vote": "up"}).status_code \
        == 201
