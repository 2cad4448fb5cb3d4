"""Print, as JSON, the headers each provider's SDK sends on every request (its auth, version and identification
headers), with the key given on the command line in place of the API key: always `upstream.SDK_KEY_PLACEHOLDER`,
as a command line is visible to every user of the host.

Run by `upstream.sdk_headers` in a throwaway interpreter, never imported by a worker: the SDKs would stay loaded for
the worker's whole life (~55 MB; `anthropic` alone loads ~2,600 modules of types) for a few header lines.
"""

from __future__ import annotations

import json
import sys

import anthropic
import openai


def main(api_key: str) -> None:
    """Build each SDK's client as llm used to and print what it sends (unset headers left out)."""
    clients: dict[str, openai.OpenAI | anthropic.Anthropic] = {
        # The base URLs only satisfy the constructors: the headers do not depend on them.
        "openai": openai.OpenAI(
            api_key=api_key, base_url="http://sdk.invalid/v1", organization=None, project=None, max_retries=0
        ),
        "anthropic": anthropic.Anthropic(api_key=api_key, base_url="http://sdk.invalid", max_retries=0),
    }
    headers = {
        name: {
            header: value
            for header, value in {**client.auth_headers, **client.default_headers}.items()
            if isinstance(value, str)
        }
        for name, client in clients.items()
    }
    json.dump(headers, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
