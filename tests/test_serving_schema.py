"""The server's OpenAPI schema (GET /openapi.json) is true. Schemathesis generates requests from it, valid ones and
ones that break it, sends them to the app in-process (ASGI, no network) and checks every answer: no 5xx, only
documented statuses and content types, bodies (event streams too) as documented, and every schema-violating request
rejected with a documented 4xx. A tiny random GPT-2 and a 4-token limit keep generation cheap; a fixed seed and a
bounded number of examples per operation keep the run reproducible and within seconds. Then focused cases for what
the schema promises and random generation reaches rarely: streams, access statuses, 405's Allow header, defaults."""

from __future__ import annotations

import collections
import json

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, StopReason, events
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)
from starlette.testclient import TestClient

from instructgpt.serving.app import create_app, load_server
from instructgpt.serving.config import Limits, ServeConfig
from instructgpt.serving.security import load_api_keys

NAME = "tiny"
SEED = 20240607
MAX_EXAMPLES = 100  # per operation; the whole run takes seconds on one core
KEY = "sk-test-" + "c3" * 12
# documented 4xx for a request that breaks the schema; 413: a body past the size limit is refused before it is read
REJECTED = ["400", "404", "413"]
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "negative_data_rejection",
          "unsupported_method"]


def tiny_limits() -> Limits:
    return Limits(max_request_bytes=20_000, max_tokens=4, max_n=2, max_best_of=2, max_prompts=2, max_rows=4,
                  max_messages=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # every test of this module, as the server shares its CPU


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    server = load_server(ServeConfig(model=tiny_model_dir, model_name=NAME, device="cpu", audit_log=None,
                                     rate_limit=0, limits=tiny_limits()))
    yield server
    server.close()


@pytest.fixture(scope="module")
def app(tiny_server):
    return create_app(tiny_server)


def load_schema(app, max_examples: int = 1, **request):
    """The app's schema as schemathesis reads it from GET /openapi.json, with the checks of this file."""
    return schemathesis.openapi.from_asgi("/openapi.json", app, **request, config=SchemathesisConfig.from_dict({
        "seed": SEED,
        "generation": {"max-examples": max_examples, "mode": "all", "database": "none"},
        "checks": {"enabled": False, **{c: {"enabled": True} for c in CHECKS},
                   "negative_data_rejection": {"enabled": True, "expected-statuses": REJECTED}}}))


def run_schemathesis(schema) -> tuple[collections.Counter, list[str], StopReason]:
    """Every phase of a schemathesis run (as its CLI runs them): the statuses each operation answered, and one line
    per distinct failure (check, operation, what, and the curl command that reproduces it)."""
    statuses: collections.Counter = collections.Counter()
    failures: dict[tuple, str] = {}
    stop = None
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            rec = event.recorder
            for interaction in rec.interactions.values():
                if interaction.response is not None:
                    statuses[rec.label, interaction.response.status_code] += 1
            for nodes in rec.checks.values():
                for node in nodes:
                    if node.status == Status.FAILURE and node.failure_info is not None:
                        info = node.failure_info
                        key = (node.name, rec.label, info.failure.title)
                        failures.setdefault(key, f"{node.name} on {rec.label}: {info.failure.title}\n"
                                                 f"{info.failure.message}\n{info.code_sample}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            failures[("error", id(event))] = f"schemathesis error: {event}"
        elif isinstance(event, events.EngineFinished):
            stop = event.stop_reason
    return statuses, list(failures.values()), stop


def test_schemathesis_finds_no_5xx_and_no_undocumented_answer(app):
    statuses, failures, stop = run_schemathesis(load_schema(app, MAX_EXAMPLES))
    assert failures == [], "\n\n".join(failures)
    assert stop == StopReason.COMPLETED
    assert not any(status >= 500 for _, status in statuses)
    # not vacuous: both generation endpoints generated text, and refused bad requests, many times over
    for op in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert statuses[op, 200] >= 50 and statuses[op, 400] >= 50, statuses
        assert statuses[op, 405] > 0  # undeclared methods were tried (and carried Allow: unsupported_method)
    assert statuses["GET /v1/models/{model_id}", 200] > 0 and statuses["GET /v1/models/{model_id}", 404] > 0


def call(schema, path: str, method: str, **kw):
    case = schema[path][method].Case(**kw)
    return case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                          response_schema_conformance, response_headers_conformance])


def test_streams_logprobs_echo_and_best_of_answer_as_documented(app):
    """What random generation reaches rarely, sent on purpose and checked against the schema: event streams (each
    chunk's JSON, the usage chunk, [DONE]), log-probs, echo, best_of, n, content parts."""
    schema = load_schema(app)
    base = {"model": NAME, "prompt": "apple pear", "max_tokens": 3}
    bodies = [{**base, "stream": True}, {**base, "stream": True, "logprobs": 2, "n": 2},
              {**base, "stream": True, "stream_options": {"include_usage": True}},
              {**base, "logprobs": 5, "return_tokens_as_token_ids": True}, {**base, "echo": True, "stop": ["e"]},
              {**base, "best_of": 2}, {**base, "prompt": [[5, 6], [7]], "n": 2}]
    for body in bodies:
        r = call(schema, "/v1/completions", "POST", body=body)
        assert r.status_code == 200, (body, r.text)
    chat = {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 3}
    for body in [{**chat, "stream": True, "stream_options": {"include_usage": True}},
                 {**chat, "stream": True, "logprobs": True, "top_logprobs": 2}, {**chat, "logprobs": True},
                 {**chat, "n": 2, "response_format": {"type": "text"}}]:
        r = call(schema, "/v1/chat/completions", "POST", body=body)
        assert r.status_code == 200, (body, r.text)
    streamed = call(schema, "/v1/completions", "POST", body={**base, "stream": True,
                                                               "stream_options": {"include_usage": True}})
    data = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["usage"]["completion_tokens"] == 3


def error_statuses(schema_json: dict, path: str, method: str) -> set[int]:
    return {int(s) for s in schema_json["paths"][path][method]["responses"] if s != "200"}


def test_the_schema_documents_what_this_server_can_answer(tiny_model_dir, app):
    """/openapi.json is served; its request bodies are the strict models bounded by the server's limits, and its
    error statuses follow the settings: 401 only with API keys, 429 only with a rate limit, 504 only with a
    request timeout."""
    open_doc = TestClient(app).get("/openapi.json").json()
    assert error_statuses(open_doc, "/v1/completions", "post") == {400, 404, 413, 500, 503}
    assert error_statuses(open_doc, "/v1/models", "get") == {500}
    assert "securitySchemes" not in open_doc["components"]
    req = open_doc["components"]["schemas"]["CompletionRequest"]
    assert req["additionalProperties"] is False and req["required"] == ["model", "prompt"]
    assert req["properties"]["model"]["enum"] == [NAME]
    assert {"type": "integer", "minimum": 1, "maximum": 4} in req["properties"]["max_tokens"]["anyOf"]
    assert req["properties"]["max_tokens"]["default"] == 4  # OpenAI's 16, within this server's limit

    keyed = load_server(ServeConfig(model=tiny_model_dir, model_name=NAME, device="cpu", audit_log=None,
                                    rate_limit=4, request_timeout_s=30, limits=tiny_limits()),
                        load_api_keys(None, f"tester:{KEY}"))
    try:
        keyed_app = create_app(keyed)
        auth = {"Authorization": f"Bearer {KEY}"}
        # the schema names the model and the limits: with keys, only a key holder reads it
        assert TestClient(keyed_app).get("/openapi.json").status_code == 401
        doc = TestClient(keyed_app).get("/openapi.json", headers=auth).json()
        assert error_statuses(doc, "/v1/completions", "post") == {400, 401, 404, 413, 429, 500, 503, 504}
        assert error_statuses(doc, "/v1/models", "get") == {401, 429, 500}
        assert doc["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]
        schema = load_schema(keyed_app, headers=auth)
        body = {"model": NAME, "prompt": "apple", "max_tokens": 2}
        assert call(schema, "/v1/completions", "POST", body=body).status_code == 401  # no key
        assert call(schema, "/v1/completions", "POST", body=body, headers=auth).status_code == 200
        assert call(schema, "/v1/models", "GET", headers=auth).status_code == 200
        limited = call(schema, "/v1/models", "GET", headers=auth)  # a burst of 4 a minute: the fifth is refused
        assert limited.status_code == 429 and int(limited.headers["retry-after"][0]) >= 1
    finally:
        keyed.close()


# --------------------------------------------------------------------------------------------------------------------
# Focused cases


def test_an_undeclared_method_gets_405_with_the_allow_header(app):
    """HTTP requires a 405 to say which methods the resource has."""
    client = TestClient(app)
    r = client.delete("/v1/completions")
    assert (r.status_code, r.headers.get("allow"), r.json()["error"]["type"]) == (405, "POST",
                                                                                   "invalid_request_error")
    assert client.put("/v1/models").headers.get("allow") == "GET"


def test_completions_default_max_tokens_stays_within_the_servers_limit(app):
    """Without max_tokens a completion gets OpenAI's 16 tokens, or the server's limit if lower (here 4), instead of
    a 400 for a number the client never sent; an explicit value over the limit is still a 400."""
    client = TestClient(app)
    body = {"model": NAME, "prompt": "apple pear plum", "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    if r.json()["choices"][0]["finish_reason"] == "length":
        assert r.json()["usage"]["completion_tokens"] == 4
    r = client.post("/v1/completions", json={**body, "max_tokens": 5})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "max_tokens")


def test_request_fields_the_schema_constrains_are_refused_as_it_says(app):
    """response_format {} has no type (OpenAI: 400); stream_options.include_usage is a boolean as strictly as every
    other flag; a text content part without its text is named for what it lacks."""
    client = TestClient(app)
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", json={**chat, "response_format": {}})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "response_format")
    for value, got in (("yes", "a string"), (1, "an integer")):
        r = client.post("/v1/chat/completions", json={**chat, "stream": True,
                                                      "stream_options": {"include_usage": value}})
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["code"]) == (400, "stream_options", "invalid_type")
        assert f"got {got} instead" in err["message"]
    r = client.post("/v1/chat/completions", json={**chat, "messages": [{"role": "user",
                                                                       "content": [{"type": "text"}]}]})
    assert r.status_code == 400 and "needs its 'text'" in r.json()["error"]["message"]
