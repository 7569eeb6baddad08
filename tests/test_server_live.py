"""The service over real HTTP: waitress in a thread (concurrent clients, size limits) and `medsim serve` itself."""

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from medsim.orthanc import free_port
from orthanc_fixtures import index_digest, live_server, make_app, medsim_command, pacs, service  # noqa: F401

TOKEN = "live-test-token-0123456789abcdef"


def test_concurrent_clients_get_consistent_answers(make_app, pacs):
    """16 clients at once, mixing indexed queries, non-indexed (PACS) queries and thumbnails: all answered, and
    every answer equals the one the same query gets alone."""
    before = index_digest(pacs.index_path)
    app = make_app()
    with live_server(app, threads=8) as base:
        session = requests.Session()

        def ask(instance, group_by="image"):
            response = requests.post(f"{base}/api/v1/similar", timeout=60,
                                     json={**instance.uids, "k": 5, "threshold": "none", "group_by": group_by})
            assert response.status_code == 200, response.text
            return [(r["sop_uid"], r["score"]) for r in response.json()["results"]]

        queries = pacs.indexed[:8] + pacs.pacs_only
        alone = {q.sop_uid: ask(q) for q in queries}
        jobs = [queries[i % len(queries)] for i in range(96)]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, jobs))
            thumbs = list(pool.map(lambda q: requests.get(f"{base}/api/v1/cases/{q.sop_uid}/thumbnail", timeout=60),
                                   pacs.indexed))
        for query, answer in zip(jobs, answers):
            assert [s for s, _ in answer] == [s for s, _ in alone[query.sop_uid]]
            assert [v for _, v in answer] == pytest.approx([v for _, v in alone[query.sop_uid]], abs=1e-5)
        assert all(t.status_code == 200 and t.headers["Content-Type"] == "image/png" for t in thumbs)
        assert session.get(f"{base}/healthz", timeout=10).json()["status"] == "ok"
    assert index_digest(pacs.index_path) == before


def test_upload_limits_over_http(make_app, pacs):
    app = make_app(max_upload_bytes=1024 * 1024)
    with live_server(app, max_request_body_size=4 * 1024 * 1024) as base:
        over = requests.post(f"{base}/api/v1/similar", data=b"\0" * (2 * 1024 * 1024),
                             headers={"Content-Type": "application/dicom"}, timeout=30)
        assert over.status_code == 413 and over.json()["error"]["code"] == "too-large"
        try:  # far beyond: waitress refuses it before the app sees it (may close the connection early)
            huge = requests.post(f"{base}/api/v1/similar", data=b"\0" * (8 * 1024 * 1024),
                                 headers={"Content-Type": "application/dicom"}, timeout=30)
            assert huge.status_code == 413
        except requests.ConnectionError:
            pass
        assert requests.get(f"{base}/healthz", timeout=10).status_code == 200


def test_medsim_serve_runs_waitress_with_tokens(pacs, tmp_path):
    """`medsim serve` end to end: refuses an open non-loopback listener, serves with a token on loopback."""
    env = {**os.environ, "MEDSIM_CACHE_DIR": str(tmp_path / "cache")}
    refused = subprocess.run(medsim_command() + ["serve", "--index", str(pacs.index_path), "--host", "0.0.0.0"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "requires bearer tokens" in refused.stderr

    token_file = tmp_path / "tokens"
    token_file.write_text(f"viewer:{TOKEN}\n")
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    process = subprocess.Popen(
        medsim_command() + ["serve", "--index", str(pacs.index_path), "--pacs", pacs.url, "--port", str(port),
                            "--token-file", str(token_file), "--audit-log", str(audit)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "medsim serve did not come up"
            time.sleep(0.25)
        query = {**pacs.pacs_only[2].uids, "k": 3}
        assert requests.post(f"{base}/api/v1/similar", json=query, timeout=60).status_code == 401
        answer = requests.post(f"{base}/api/v1/similar", json=query, timeout=60,
                               headers={"Authorization": f"Bearer {TOKEN}"})
        assert answer.status_code == 200 and answer.json()["query"]["source"] == "pacs"
        assert answer.headers["Server"] == "medsim"  # waitress, not Flask's development server
        assert '"client":"viewer"' in audit.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0  # a clean stop on SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
