"""Schema-driven fuzzing of the HTTP API (Schemathesis): requests generated from
the app's own OpenAPI document, valid ones and deliberately invalid ones, must
each get a documented status with a body matching the documented schema, and
never a 500."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from imgclf.serve import create_app  # noqa: E402

#: Examples per generation mode: a short budget for the normal suite (about 10 s in all;
#: valid requests carry real generated images, which the network scores).
EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 40}


@pytest.fixture(scope="module")
def api_schema(small_model):
    app = create_app(small_model, max_batch=2, max_request_bytes=1_000_000)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    yield schema
    from schemathesis.python.asgi import shutdown_lifespans

    shutdown_lifespans()  # stop the app's batcher and decode threads now, not at exit


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_answers_as_documented(api_schema, mode):
    seen = []

    @given(case=api_schema.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        # "Schema-valid request rejected" is left out: a schema cannot say "a decodable image",
        # so generated binary bodies are rightly refused with 415 (a documented status).
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        seen.append((case.operation.label, response.status_code))

    check()
    # operations without parameters have no invalid form: negative cases all go to /v1/predict
    expected = {"POST /v1/predict"} | ({"GET /v1/model", "GET /healthz"} if mode == GenerationMode.POSITIVE else set())
    assert {label for label, _ in seen} >= expected
    statuses = {status for _, status in seen}
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses
    else:
        assert statuses <= {200, 400, 413, 415, 422}
