"""A property-based fuzz of the server's HTTP API, generated from its own OpenAPI schema: no request, however
odd, gets a 500. Deterministic (Hypothesis derandomised) so that CI reruns the same requests.

Left out, with the reason: training and scoring runs (each starts a subprocess that loads the model: minutes of
CPU per example; their parameters are checked by tests/test_continual.py and tests/test_active_learning.py),
batch and whole-slide inference (not this app's tasks), the DICOMweb proxy (no PACS behind a folder datastore)
and the logs and OHIF static pages (files, not an API).
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import QUIET_ENV, quiet_server_conf, server_folders
from lib.evaluation.server import ServerProcess

pytestmark = pytest.mark.slow

SKIPPED_PREFIXES = ("/train", "/scoring", "/batch", "/infer/wsi", "/proxy", "/logs", "/ohif")
EXAMPLES = 60  # per operation (about 20 s for all on 2 cores)


@pytest.fixture(scope="module")
def fuzzed(sample_data, tmp_path_factory):
    studies, log = server_folders(sample_data, tmp_path_factory, "-fuzz")
    conf = quiet_server_conf(sample_data, tmp_path_factory.mktemp("model-fuzz"))
    with ServerProcess(studies, log, conf, env=QUIET_ENV) as server:
        yield server


def test_no_request_from_the_openapi_schema_gets_a_500(fuzzed):
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    operations = [
        result.ok() for result in schema.get_all_operations() if not result.ok().path.startswith(SKIPPED_PREFIXES)
    ]
    assert len(operations) >= 15, [f"{o.method} {o.path}" for o in operations]
    session = requests.Session()
    failures: dict[str, str] = {}  # one example per operation and answer
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def exercise(case) -> None:
            response = case.call(base_url=fuzzed.url, session=session, timeout=120)
            if response.status_code >= 500:
                kind = f"{case.method.upper()} {case.operation.path}: {response.status_code} {response.text[:120]}"
                failures.setdefault(kind, f"{case.formatted_path} query={case.query}")

        exercise()
    assert not failures, "\n".join(f"{kind}\n    e.g. {example}" for kind, example in failures.items())
