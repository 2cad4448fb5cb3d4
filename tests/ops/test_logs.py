"""Logs: the Logstash pipeline takes what the kit ships (tcp + json_lines) into a data stream, and the Kibana saved
objects are importable (NDJSON, references resolve) and search the fields the kit writes."""

from __future__ import annotations

import json
import logging
import re
from functools import cache

import yaml
from opslib import DEPLOY, ROOT

from parley_kit import tracing
from parley_kit.logs import LogstashEcsFormatter
from parley_kit.settings import ServiceSettings

PIPELINE = DEPLOY / "logstash" / "pipeline" / "parley.conf"
SAVED_OBJECTS = DEPLOY / "kibana" / "saved_objects.ndjson"


def strip_comments(text: str) -> str:
    """The pipeline without `#` comments (none of our values contains a #)."""
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def block(text: str, name: str) -> str:
    """The body of the first `name { ... }` block, braces balanced."""
    match = re.search(rf"\b{name}\s*\{{", text)
    assert match, f"no {name} block"
    depth, start = 1, match.end()
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index]
    raise AssertionError(f"unbalanced braces after {name}")


def setting(body: str, key: str) -> str | None:
    """A plugin option's value (`key => value`), unquoted."""
    match = re.search(rf"\b{key}\s*=>\s*(\"[^\"]*\"|\[[^\]]*\]|\S+)", body)
    return match.group(1).strip('"') if match else None


@cache
def pipeline() -> str:
    """The pipeline text without comments."""
    return strip_comments(PIPELINE.read_text())


def test_pipeline_sections_are_balanced() -> None:
    """input, filter and output, nothing outside them."""
    text = pipeline()
    assert text.count("{") == text.count("}")
    rest = text
    for section in ("input", "filter", "output"):
        rest = rest.replace(block(rest, section), "", 1)
    assert re.sub(r"\b(input|filter|output)\s*\{\s*\}", "", rest).strip() == ""


def test_input_is_tcp_json_lines_on_the_port_the_services_use() -> None:
    """What python-logstash's TCP handler sends: newline-delimited JSON, on PARLEY_LOGSTASH_PORT's default."""
    tcp = block(block(pipeline(), "input"), "tcp")
    assert setting(tcp, "codec") == "json_lines"
    port = int(setting(tcp, "port") or 0)
    assert port == ServiceSettings.model_fields["logstash_port"].default
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert str(port) in compose["logstash"]["expose"]
    assert f"PARLEY_LOGSTASH_PORT:-{port}" in (ROOT / "docker-compose.yml").read_text()
    # Legacy mode would add `host` as a string beside the records' ECS host object.
    assert setting(tcp, "ecs_compatibility") == "v8"


def test_output_is_the_logs_parley_data_stream() -> None:
    """Elasticsearch data stream logs-parley-<namespace>, never a plain index."""
    output = block(block(pipeline(), "output"), "elasticsearch")
    assert setting(output, "data_stream") == "true"
    assert setting(output, "data_stream_type") == "logs"
    assert setting(output, "data_stream_dataset") == "parley"
    assert setting(output, "index") is None, "a data stream output takes no index"
    assert "elasticsearch:9200" in (setting(output, "hosts") or "")


def test_kit_records_are_json_lines_with_the_fields_kibana_reads() -> None:
    """A record as the kit ships it to Logstash decodes as one JSON line carrying ECS trace and service fields."""
    formatter = LogstashEcsFormatter("llm", "0.1.0", "test")
    tracing.start("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    try:
        record = logging.LogRecord("parley.access", logging.INFO, __file__, 1, "GET /v1/models 200", None, None)
        record.__dict__.update({"url.path": "/v1/models", "http.response.status_code": 200})
        line = formatter.format(record) + b"\n"
    finally:
        tracing.clear()
    assert line.count(b"\n") == 1
    document = json.loads(line)
    assert document["trace"]["id"] == "0af7651916cd43dd8448eb211c80319c"
    assert document["service"]["name"] == "llm" and isinstance(document["host"], dict)
    for field in kibana_columns():
        node = document
        for part in field.split("."):
            assert isinstance(node, dict) and part in node, f"Kibana column {field} is not in the kit's records"
            node = node[part]


# --- Kibana ----------------------------------------------------------------------------------------------------------


@cache
def saved_objects() -> list[dict]:
    """The NDJSON file, one object per line."""
    lines = SAVED_OBJECTS.read_text().splitlines()
    assert all(line.strip() for line in lines), "blank lines break the import"
    return [json.loads(line) for line in lines]


def by_type(kind: str) -> list[dict]:
    """Saved objects of one type."""
    return [obj for obj in saved_objects() if obj["type"] == kind]


def search_source(obj: dict) -> dict:
    """A saved object's embedded search source (itself JSON in a string)."""
    return json.loads(obj["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])


def kibana_columns() -> set[str]:
    """Columns the saved searches show that every record has (not the per-event extras)."""
    always = {"service.name", "log.level", "log.logger", "message", "trace.id", "span.id"}
    columns = {column for obj in by_type("search") for column in obj["attributes"]["columns"]}
    return columns & always


def test_saved_objects_have_unique_ids_and_known_types() -> None:
    """A data view, the saved searches and a dashboard; ids unique (import overwrites by id)."""
    ids = [(obj["type"], obj["id"]) for obj in saved_objects()]
    assert len(set(ids)) == len(ids)
    assert {obj["type"] for obj in saved_objects()} == {"index-pattern", "search", "dashboard"}
    for obj in saved_objects():
        assert obj["attributes"]["title"], obj["id"]


def test_data_view_reads_the_logstash_data_stream() -> None:
    """The data view's pattern matches logs-<type>-<dataset>-… as written by the pipeline, on @timestamp."""
    (view,) = by_type("index-pattern")
    output = block(block(pipeline(), "output"), "elasticsearch")
    stream = f"{setting(output, 'data_stream_type')}-{setting(output, 'data_stream_dataset')}-default"
    pattern = view["attributes"]["title"]
    assert re.fullmatch(pattern.replace(".", r"\.").replace("*", ".*"), stream)
    assert view["attributes"]["timeFieldName"] == "@timestamp"


def test_every_reference_resolves() -> None:
    """Each reference names an object of that type in the file; each search and panel uses its references."""
    present = {(obj["type"], obj["id"]) for obj in saved_objects()}
    for obj in saved_objects():
        names = set()
        for reference in obj["references"]:
            assert (reference["type"], reference["id"]) in present, f"{obj['id']} -> {reference}"
            names.add(reference["name"])
        if obj["type"] == "search":
            source = search_source(obj)
            assert source["indexRefName"] in names
            assert source["query"]["language"] == "kuery" and source["query"]["query"]
        if obj["type"] == "dashboard":
            panels = json.loads(obj["attributes"]["panelsJSON"])
            assert panels
            assert {panel["panelRefName"] for panel in panels} == names
            assert len({panel["panelIndex"] for panel in panels}) == len(panels)


def test_searches_by_trace_and_by_service() -> None:
    """The two searches an operator starts from: one trace across services, and one service's records."""
    queries = {obj["id"]: search_source(obj)["query"]["query"] for obj in by_type("search")}
    assert any(query.startswith("trace.id") for query in queries.values())
    assert any(query.startswith("service.name") for query in queries.values())
    trace_search = next(obj for obj in by_type("search") if search_source(obj)["query"]["query"].startswith("trace.id"))
    assert trace_search["attributes"]["sort"] == [["@timestamp", "asc"]], "a trace reads oldest first"
    assert "service.name" in trace_search["attributes"]["columns"]


def test_compose_imports_the_saved_objects() -> None:
    """The one-shot posts this very file to Kibana's import API once Kibana is healthy."""
    setup = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["kibana-setup"]
    (mount,) = setup["volumes"]
    source, target, _ = mount.split(":")
    assert (ROOT / source).resolve() == SAVED_OBJECTS
    command = " ".join(setup["command"])
    assert "/api/saved_objects/_import" in command and f"file=@{target}" in command and "kbn-xsrf" in command
    assert setup["depends_on"] == {"kibana": {"condition": "service_healthy"}}
