"""Schemathesis fuzzes every operation of the OpenAPI schema against a real API process: no 5xx.

The API runs with a key prefix of its own (so nothing it queues reaches the session's
worker) and small limits, so generated datasets stay tiny.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.service.conftest import PYTHON, free_port, service_env, start_process, wait_for_http

EXAMPLES = int(os.environ.get("SSD_FUZZ_EXAMPLES", "12"))  # per operation and mode; more for a longer hunt


@pytest.fixture(scope="module")
def fuzzed_api(redis_server, tmp_path_factory, log_dir):
    port = free_port()
    env = service_env(
        redis_server.url,
        tmp_path_factory.mktemp("fuzz"),
        SSD_PORT=str(port),
        SSD_KEY_PREFIX=f"fuzz-{os.getpid()}",
        SSD_MAX_SYNTHETIC_IMAGES="2",
        SSD_MAX_QUEUED_JOBS="5",
    )
    process = start_process("fuzz-api", [PYTHON, "-m", "app"], env, log_dir)
    base_url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{base_url}/healthz", process)
    yield base_url
    process.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_a_server_error(fuzzed_api, mode):
    """Valid (positive) and invalid (negative) requests generated from the schema, for every operation."""
    schema = schemathesis.openapi.from_url(f"{fuzzed_api}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    statuses: dict[str, set[int]] = {}
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def no_server_error(case) -> None:
            response = case.call(timeout=20)
            statuses.setdefault(case.operation.label, set()).add(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])

        try:
            no_server_error()
        except Unsatisfiable:  # nothing invalid to send (no parameters, no body): e.g. GET /healthz
            assert mode == GenerationMode.NEGATIVE
    # Negative cases exist only for the 7 operations with a body or a bounded parameter (without keys no
    # X-API-Key is declared, so no operation gets one just for the header).
    assert len(statuses) >= (14 if mode == GenerationMode.POSITIVE else 7), statuses
