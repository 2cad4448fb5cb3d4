"""Contract fuzzing (issue #9): real credentials and each service's live OpenAPI document, loaded for schemathesis."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import requests
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.schemas import BaseSchema

if TYPE_CHECKING:
    from conftest import Client, RunningPlatform

# Generation is bounded and derandomized by the tests' Hypothesis settings; here only what every call needs.
FUZZ_CONFIG: dict[str, Any] = {
    "request-timeout": 30,
    "generation": {
        # The tests send real credentials themselves (an admin's, a service's or a member's, by route); a generated
        # Authorization header would replace them, and a case "without auth" would still carry ours. Refusal of
        # missing and bad credentials is checked by schemathesis' ignored_auth check and the 401s it provokes.
        "with-security-parameters": False,
        # Unknown query parameters and headers are ignored, as OpenAI's API and most HTTP APIs do: a client or proxy
        # adding one must not break a call. (This also stops negative cases that add undeclared JSON body fields;
        # bodies accept them as the documents say, except UserUpdateBody, which documents additionalProperties: false.)
        "allow-extra-parameters": False,
        # PostgreSQL text cannot hold NUL, which no document states field by field; the services answer it with a
        # 400 (parley_kit.errors), which test_nul_characters_are_refused checks on every kind of input instead.
        "allow-x00": False,
    },
}


@dataclass(frozen=True)
class Credentials:
    """Real credentials from the running platform, one per kind of caller the services document."""

    user: Client  # a registered member with an API key
    admin_token: str  # an admin made the operator's way (`parley_auth create-admin`)
    service_token: str  # the gateway's service account (client credentials)


def _login(platform: RunningPlatform, email: str, password: str) -> str:
    answer = requests.post(
        f"{platform.url('auth')}/auth/token", json={"email": email, "password": password}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


@pytest.fixture(scope="session")
def fuzz_credentials(platform: RunningPlatform) -> Credentials:
    """A member (token + API key), an admin created with the real CLI, and a service token."""
    email, password = f"admin-{uuid.uuid4().hex[:12]}@example.com", secrets.token_urlsafe(16)
    config = platform.config
    env = {
        **os.environ,
        "PARLEY_ENV": "test",
        "AUTH_DATABASE_URL": config.database_urls["auth"],
        "AUTH_API_KEY_PEPPER_SECRET": config.secrets["pepper"],
        "AUTH_SERVICE_CLIENTS": json.dumps({"gateway": config.secrets["gateway"], "jobs": config.secrets["jobs"]}),
    }
    created = subprocess.run(
        [sys.executable, "-m", "parley_auth", "create-admin", "--email", email, "--password", password],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    service = requests.post(
        f"{platform.url('auth')}/auth/service-token",
        json={"client_id": "gateway", "client_secret": platform.config.secrets["gateway"]},
        timeout=10,
    )
    assert service.status_code == 200, service.text
    return Credentials(platform.new_client(), _login(platform, email, password), service.json()["access_token"])


def load_schema(document_url: str, base_url: str) -> BaseSchema:
    """The live OpenAPI document at `document_url`, to be exercised at `base_url`."""
    answer = requests.get(document_url, timeout=10)
    assert answer.status_code == 200, answer.text
    schema = schemathesis.openapi.from_dict(answer.json(), config=SchemathesisConfig.from_dict(FUZZ_CONFIG))
    schema.config.update(base_url=base_url)
    return schema


# Each service's own document, called directly (every service verifies bearer tokens itself).
@pytest.fixture(scope="session")
def auth_direct(platform: RunningPlatform) -> BaseSchema:
    """auth's document, against auth."""
    return load_schema(f"{platform.url('auth')}/openapi/openapi.json", platform.url("auth"))


@pytest.fixture(scope="session")
def llm_direct(platform: RunningPlatform) -> BaseSchema:
    """llm's document, against llm."""
    return load_schema(f"{platform.url('llm')}/openapi/openapi.json", platform.url("llm"))


@pytest.fixture(scope="session")
def jobs_direct(platform: RunningPlatform) -> BaseSchema:
    """jobs' document, against jobs."""
    return load_schema(f"{platform.url('jobs')}/openapi/openapi.json", platform.url("jobs"))


# The gateway's aggregated view (`/docs/<service>.json`), against the gateway: the public door's contract.
@pytest.fixture(scope="session")
def auth_gateway(platform: RunningPlatform) -> BaseSchema:
    """auth's document as the gateway publishes it, against the gateway."""
    return load_schema(f"{platform.gateway}/docs/auth.json", platform.gateway)


@pytest.fixture(scope="session")
def llm_gateway(platform: RunningPlatform) -> BaseSchema:
    """llm's document as the gateway publishes it, against the gateway."""
    return load_schema(f"{platform.gateway}/docs/llm.json", platform.gateway)


@pytest.fixture(scope="session")
def jobs_gateway(platform: RunningPlatform) -> BaseSchema:
    """jobs' document as the gateway publishes it, against the gateway."""
    return load_schema(f"{platform.gateway}/docs/jobs.json", platform.gateway)
