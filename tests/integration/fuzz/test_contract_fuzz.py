"""Contract fuzzing (issue #9): schemathesis against every service's live OpenAPI document, direct and through the
gateway, with real credentials.

Every generated request, valid (positive) or not (negative), must get an answer the document promises: no 5xx (the
fake provider is never told to fail here), a documented status code, the documented content type, a body matching
the documented schema, and invalid input refused with a 4xx. Generation is derandomized, so a failure reproduces.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

if TYPE_CHECKING:
    from schemathesis import CheckContext, Response
    from schemathesis.schemas import APIOperation, BaseSchema

    from .conftest import Credentials

# Login throttling counts failures per client address; auth believes X-Forwarded-For from the gateway and from
# 127.0.0.1. The fuzzer's wrong passwords come from a documentation address of their own, so they never lock out
# the other integration tests, which log in from 127.0.0.1.
FUZZ_ADDRESS = "198.51.100.9"
ADMIN_PATHS = ("/auth/users", "/auth/invites", "/v1/budgets", "/v1/usage/all")
SERVICE_PATHS = ("/auth/internal/", "/auth/service-token")
MAX_EXAMPLES = int(os.environ.get("PARLEY_FUZZ_MAX_EXAMPLES", "8"))  # per operation and mode

# Reproducible and bounded: no random seed, no example database, and no shrinking (each shrink step is another
# real request; the first failing case, with its curl line, is enough to act on).
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


# Listed exclusions, each a rule the service enforces that JSON Schema cannot state, so a schema-valid request may
# still be refused with a 400. Only a 400 whose error message matches is let through, only on that operation, and
# only for positive (schema-valid) cases; every other check (schema, status, content type, 5xx) still applies.
BUSINESS_RULE_REFUSALS: dict[str, re.Pattern[str]] = {
    # Each model has its own output ceiling (models.yaml max_output_tokens): the schema cannot tie it to `model`.
    "POST /v1/chat/completions": re.compile(r"^max_(completion_)?tokens is too large"),
    "POST /v1/messages": re.compile(r"^max_tokens is too large"),
    # "now" moves: the schema can say date-time, not "in the future".
    "POST /auth/api-keys": re.compile(r"^expires_at must be in the future$"),
    "POST /auth/invites": re.compile(r"^expires_at must be in the future$"),
    # email-validator refuses special-use domains (RFC 6761: .test, .localhost, ...) that format "email" allows.
    "POST /auth/register": re.compile(r"^email: value is not a valid email address"),
    # A cursor must name one of the caller's own objects: a well-formed unknown id is refused (code invalid_cursor).
    "GET /v1/files": re.compile(r"^after: no such file"),
    "GET /v1/batches": re.compile(r"^after: no such batch"),
    # A cross-field rule on the query (JSON Schema cannot compare two parameters).
    "GET /v1/usage": re.compile(r"^start must not be after end$"),
    "GET /v1/usage/all": re.compile(r"^start must not be after end$"),
    # purpose=batch files must hold valid batch request JSONL: the upload's content is checked, not its shape.
    "POST /v1/files": re.compile(r"^(line \d+: |the file is not UTF-8 text$|the file holds no requests$)"),
}


def _error_message(response: Response) -> str:
    """The human message of an error in any of the three shapes (problem+json, OpenAI, Anthropic)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))
    return str(body.get("detail", ""))


def positive_data_acceptance_with_listed_rules(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """schemathesis' positive_data_acceptance, except the listed business-rule refusals."""
    rule = BUSINESS_RULE_REFUSALS.get(case.operation.label)
    if rule is not None and response.status_code == 400 and rule.search(_error_message(response)):
        return None
    return positive_data_acceptance(ctx, response, case)


def headers_for(operation: APIOperation, credentials: Credentials, *, via_gateway: bool) -> dict[str, str]:
    """The bearer a real caller of this operation holds: an admin's token on admin routes, the gateway's service
    token on internal routes, otherwise the member's (its API key through the gateway, as the SDKs send it)."""
    path = operation.path
    if path.startswith(ADMIN_PATHS):
        token = credentials.admin_token
    elif path.startswith(SERVICE_PATHS):
        token = credentials.service_token
    elif via_gateway and path.startswith("/v1/"):
        token = credentials.user.api_key
    else:
        token = credentials.user.access_token
    return {"Authorization": f"Bearer {token}", "X-Forwarded-For": FUZZ_ADDRESS}


def fuzz_operation(operation: APIOperation, mode: GenerationMode, headers: dict[str, str]) -> str | None:
    """Run the bounded, derandomized cases of one operation in one mode; the failure report, or None."""

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Case) -> None:
        case.call_and_validate(
            headers=headers,
            excluded_checks=[positive_data_acceptance],
            additional_checks=[positive_data_acceptance_with_listed_rules],
        )

    try:
        run()
    except FailureGroup as exc:
        return str(exc)
    except Unsatisfiable:
        # Only an operation with no inputs at all (GET /.well-known/jwks.json) has nothing to make invalid.
        if mode is not GenerationMode.NEGATIVE:
            raise
    return None


def fuzz(schema: BaseSchema, credentials: Credentials, *, via_gateway: bool) -> int:
    """Fuzz every operation of the document, positive and negative; fail listing every broken operation."""
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the document does not load: {result.err()}"
        operation = result.ok()
        operations += 1
        headers = headers_for(operation, credentials, via_gateway=via_gateway)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            report = fuzz_operation(operation, mode, headers)
            if report is not None:
                failures.append(f"### {operation.label} ({mode.value})\n{report}")
    assert not failures, f"{len(failures)} contract failures:\n\n" + "\n\n".join(failures)
    return operations


@pytest.mark.parametrize("service", ["auth", "llm", "jobs"])
def test_direct(service: str, request: pytest.FixtureRequest, fuzz_credentials: Credentials) -> None:
    """Each service's own document, called directly: every service verifies bearer tokens itself."""
    schema: BaseSchema = request.getfixturevalue(f"{service}_direct")
    assert fuzz(schema, fuzz_credentials, via_gateway=False) > 0


@pytest.mark.parametrize("service", ["auth", "llm", "jobs"])
def test_via_gateway(service: str, request: pytest.FixtureRequest, fuzz_credentials: Credentials) -> None:
    """The documents the gateway publishes (`/docs/<service>.json`), called through the gateway."""
    schema: BaseSchema = request.getfixturevalue(f"{service}_gateway")
    assert fuzz(schema, fuzz_credentials, via_gateway=True) > 0
