"""Schema-driven fuzzing of the HTTP API (Schemathesis): requests generated from
the app's own OpenAPI document, valid ones and deliberately invalid ones, must
each get a documented status with a body matching the documented schema, and
never a 500."""

import os

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("torch")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from imgclf.serve import create_app  # noqa: E402

from .conftest import PREDICT  # noqa: E402

#: Examples per generation mode: a short, fixed (derandomized) budget for the normal suite,
#: a few seconds (valid requests carry real generated images, which the network scores).
#: IMGCLF_FUZZ_EXAMPLES=N runs N random examples per mode instead, to look further.
LONG_RUN = int(os.environ.get("IMGCLF_FUZZ_EXAMPLES", "0"))
EXAMPLES = {GenerationMode.POSITIVE: LONG_RUN or 25, GenerationMode.NEGATIVE: LONG_RUN or 40}


CONFIG = schemathesis.config.SchemathesisConfig.from_dict(
    {
        "checks": {
            # a schema cannot say "a decodable image", so generated binary bodies are rightly
            # refused with 415 (a documented status): "schema-valid request rejected" is left out
            "positive_data_acceptance": {"enabled": False},
            # 413 is how size limits (more than 64 files, too many bytes) reject invalid data
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5XX"]
            },
        }
    }
)


@pytest.fixture(scope="module")
def api_schema(small_model):
    app = create_app(small_model, max_batch=2, max_request_bytes=1_000_000)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    yield schema
    from schemathesis.python.asgi import shutdown_lifespans

    shutdown_lifespans()  # stop the app's batcher and decode threads now, not at exit


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_answers_as_documented(api_schema, mode):
    seen = []

    @given(case=api_schema.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[mode], derandomize=not LONG_RUN, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(case):
        response = case.call_and_validate()
        seen.append((case.operation.label, response.status_code))

    check()
    # operations without parameters have no invalid form: negative cases all go to /v1/predict
    expected = {"POST /v1/predict"} | ({"GET /v1/model", "GET /healthz"} if mode == GenerationMode.POSITIVE else set())
    assert {label for label, _ in seen} >= expected
    statuses = {status for _, status in seen}
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses
        # generated bodies are random bytes (415): a real photo must get a 200 that matches the
        # documented response schema too, or a broken success path would pass on /healthz alone
        photo = (PREDICT / "classic-daisy.jpg").read_bytes()
        case = api_schema["/v1/predict"]["POST"].Case(body=photo, media_type="image/jpeg")
        response = case.call_and_validate()
        assert response.status_code == 200 and response.json()["results"][0]["label"] == "daisy"
    else:
        assert statuses <= {200, 400, 413, 415, 422}
