"""Property-based fuzzing of the API from its own OpenAPI document (schemathesis), in-process over WSGI (no network
besides the loopback Orthanc that non-indexed UIDs are looked up in).

For every operation of the document the server serves (``/api/v1/openapi.yaml``), schemathesis generates valid and
invalid requests (path, query string, JSON, multipart and raw bodies) and checks each answer:

* no 5xx (``not_a_server_error``): whatever a client sends, the server answers with a reason;
* the status code, content type, headers and body are the ones the document declares for that operation;
* data the document says is invalid is rejected with a 4xx (``negative_data_rejection``): the document's limits
  (k's maximum, the UID pattern, enums, additionalProperties) are the server's.

Bounded: at most ``MAX_EXAMPLES`` generated requests per operation and mode, no deadline per example (the machine is
shared), no shrinking; the whole module takes about a minute.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from orthanc_fixtures import make_app, pacs, service  # noqa: E402,F401

MAX_EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


# GET /api/v1/openapi.yaml has no inputs (its answer is checked in test_server.py); getIndex and healthz have none
# to make invalid either, so they are fuzzed with valid requests only.
OPERATIONS = ("similar", "getCase", "getThumbnail", "getIndex", "explain", "cohort", "healthz")
WITH_INPUTS = ("similar", "getCase", "getThumbnail", "explain", "cohort")
TOKEN = "fuzz-token-0123456789abcdef"  # the server has tokens, as beyond loopback; every request sends this one


def operation(app, operation_id: str):
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.yaml", app)
    # Authorization is not fuzzed here (tests/test_server_security.py covers tokens): always the valid token.
    schema.config.generation.update(with_security_parameters=False)
    found = {result.ok().definition.raw.get("operationId"): result.ok() for result in schema.get_all_operations()}
    assert set(OPERATIONS) <= set(found), sorted(found)
    return found[operation_id]


CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [(op, GenerationMode.NEGATIVE) for op in WITH_INPUTS]


@pytest.mark.parametrize("operation_id, mode", CASES, ids=[f"{op}-{mode.value}" for op, mode in CASES])
def test_api_matches_its_openapi_document(make_app, operation_id, mode):
    """Each operation, valid and invalid requests: every answer is one the document allows, never a 5xx.
    (Driven by hypothesis directly: schemathesis's lazy pytest fixture does not run under pytest 9.)"""
    strategy = operation(make_app(tokens={"fuzz": TOKEN}), operation_id).as_strategy(generation_mode=mode)
    seen = []

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=strategy)
    def run(case):
        response = case.call_and_validate(checks=CHECKS, headers={"Authorization": f"Bearer {TOKEN}"})
        seen.append(response.status_code)

    run()
    assert seen, f"no request was generated for {operation_id} ({mode.value})"
