"""Tool calls and structured output on the real server and SmolLM2 (numpy backend), through the `openai` client
and raw HTTP: response_format (json_object, json_schema strict), llama.cpp's `grammar`, llama-server's `json_schema`,
tools with tool_choice none / required / a named function, streamed tool-call deltas, `tool` messages sent back,
and 400s naming the field for bad schemas, grammars and tools."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from server_helpers import LiveServer
from vkpack.runtime.constrain import closed_objects
from vkpack.runtime.engine import Engine
from vkpack.runtime.sampler import SamplingParams
from vkpack.runtime.server import structured
from vkpack.runtime.toolcalls import ToolFormat, parse_tool_request, render_prompt, template_messages

NAME = "smol"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"], "additionalProperties": False}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(smollm2_archive):
    s = LiveServer(Engine(smollm2_archive, device="numpy"), model_name=NAME)
    yield s
    s.close()


def check_person(obj):
    assert isinstance(obj, dict) and set(obj) == {"name", "age", "hobbies"}, obj
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 24
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool)
    assert isinstance(obj["hobbies"], list) and len(obj["hobbies"]) <= 3
    assert all(isinstance(h, str) and len(h) <= 16 for h in obj["hobbies"])


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


# ---- structured output ----


def test_json_schema_strict_gives_a_valid_document(served):
    r = served.client.chat.completions.create(model=NAME, messages=ASK_PERSON, max_tokens=100, temperature=0,
                                              response_format=person_format())
    assert r.choices[0].finish_reason == "stop"
    check_person(json.loads(r.choices[0].message.content))
    assert r.choices[0].message.tool_calls is None


def test_json_schema_streamed_is_the_same_document(served):
    plain = served.client.chat.completions.create(model=NAME, messages=ASK_PERSON, max_tokens=100, temperature=0,
                                                  response_format=person_format()).choices[0].message.content
    chunks = list(served.client.chat.completions.create(model=NAME, messages=ASK_PERSON, max_tokens=100, temperature=0,
                                                        response_format=person_format(), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    check_person(json.loads(text))
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_gives_an_object(served):
    r = served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "List three colours."}],
                                              max_tokens=80, temperature=0, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_gbnf_grammar_is_obeyed_on_both_endpoints(served):
    grammar = 'root ::= ("yes" | "no") "." " " [A-Z][a-z]{2,8} "!"'
    r = served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Is Paris in France?"}],
                                              max_tokens=20, temperature=0.7, seed=5, extra_body={"grammar": grammar})
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    head, word = text.split(" ")
    assert head in ("yes.", "no.") and word[0].isupper() and word[1:-1].islower() and word.endswith("!"), text
    r = served.post("/v1/completions", {"prompt": "Q: Is the sky blue?\nA:", "max_tokens": 8, "temperature": 0,
                                        "grammar": 'root ::= " yes" | " no"'})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in (" yes", " no")


def test_llama_server_json_schema_field_on_completions(served):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = served.post("/v1/completions", {"prompt": "The weather today, as JSON:", "max_tokens": 40, "temperature": 0,
                                        "json_schema": schema})
    assert r.status_code == 200, r.text
    obj = json.loads(r.json()["choices"][0]["text"])
    assert set(obj) == {"city", "sunny"} and isinstance(obj["sunny"], bool) and len(obj["city"]) <= 20


def test_n_choices_each_follow_the_schema(served):
    r = served.client.chat.completions.create(model=NAME, messages=ASK_PERSON, max_tokens=100, temperature=1.0,
                                              seed=3, n=2, response_format=person_format(strict=False))
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.finish_reason == "stop"
        check_person(json.loads(c.message.content))


def test_object_schemas_are_closed_unless_they_say_otherwise():
    """llama.cpp's and vLLM's reading: an object listing `properties` allows no other keys by default."""
    item = {"type": "object", "properties": {"a": {"type": "integer"}}}
    schema = {"type": "object", "properties": {"x": item, "open": {**item, "additionalProperties": True},
                                               "list": {"type": "array", "items": item},
                                               "both": {"allOf": [item, {"properties": {"b": {}}}]}},
              "$defs": {"d": item}, "anyOf": [item]}
    out = closed_objects(schema)
    closed = {**item, "additionalProperties": False}
    assert out["additionalProperties"] is False and out["properties"]["x"] == closed
    assert out["properties"]["list"]["items"] == closed and out["$defs"]["d"] == closed and out["anyOf"] == [closed]
    assert out["properties"]["open"]["additionalProperties"] is True
    assert out["properties"]["both"] == schema["properties"]["both"]   # allOf parts are left open
    assert closed_objects({"type": "object"}) == {"type": "object"}    # any object stays any object
    assert "additionalProperties" not in item                           # a copy: the request is not changed


def test_a_schema_without_additional_properties_gets_no_invented_keys(served):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"]}
    r = served.client.chat.completions.create(model=NAME, messages=ASK_PERSON, max_tokens=60, temperature=0,
                                              response_format={"type": "json_schema", "json_schema": {
                                                  "name": "p", "schema": schema}})
    assert list(json.loads(r.choices[0].message.content)) == ["name"]


# ---- tools ----


def _call_args(call, names=("get_weather", "get_time")) -> dict:
    assert call.type == "function" and call.function.name in names and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert set(args) == {"city"} and isinstance(args["city"], str)
    else:   # no invented keys: the parameters' objects are closed (test_object_schemas_are_closed)
        assert set(args) == {"zone"} and args["zone"] in ("UTC", "CET")
    return args


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_choice_gives_tool_calls(served, choice):
    r = served.client.chat.completions.create(model=NAME, messages=ASK_WEATHER, max_tokens=80, temperature=0,
                                              tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert len(c.message.tool_calls) == 1
    _call_args(c.message.tool_calls[0], ("get_time",) if isinstance(choice, dict) else ("get_weather", "get_time"))


def test_streamed_tool_call_deltas_assemble_to_the_same_call(served):
    kw = {"model": NAME, "messages": ASK_WEATHER, "max_tokens": 80, "temperature": 0, "tools": [WEATHER, TIME],
          "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    whole = served.client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    reasons, content = [], ""
    for chunk in served.client.chat.completions.create(**kw, stream=True):
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert content == "" and list(calls) == [0]
    assert (calls[0]["name"], json.loads(calls[0]["arguments"])) == (whole.function.name,
                                                                     json.loads(whole.function.arguments))
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert [r for r in reasons if r] == ["tool_calls"]


def test_streamed_tool_call_on_the_wire(served):
    body = {"messages": ASK_WEATHER, "max_tokens": 80, "temperature": 0, "tools": [WEATHER], "tool_choice": "required",
            "parallel_tool_calls": False, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and len(calls[0]) == 1
    call = calls[0][0]
    assert set(call) == {"index", "id", "type", "function"} and call["index"] == 0 and call["type"] == "function"
    assert call["function"]["name"] == "get_weather" and set(json.loads(call["function"]["arguments"])) == {"city"}
    assert all(not d.get("content") for d in deltas)   # the call's text is not sent as content too
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 10


def test_tool_choice_none_is_plain_content_as_without_tools(served):
    kw = {"model": NAME, "messages": ASK_WEATHER, "max_tokens": 16, "temperature": 0}
    without = served.client.chat.completions.create(**kw)
    none = served.client.chat.completions.create(**kw, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == without.choices[0].message.content   # tools not even shown
    assert none.usage.prompt_tokens == without.usage.prompt_tokens


def test_tool_result_round_trip(served):
    first = served.client.chat.completions.create(model=NAME, messages=ASK_WEATHER, max_tokens=80, temperature=0,
                                                  tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK_WEATHER, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'}]
    r = served.client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                              tools=[WEATHER])
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.message.content and not c.message.tool_calls
    # the prompt held the call and its result: the server's render of this conversation, token for token
    prompt = render_prompt(served.engine.archive.tokenizer, template_messages(messages),
                           parse_tool_request({"tools": [WEATHER]}))
    assert '"temperature_c": 21' in prompt and '"city"' in prompt.split("<tool_response>")[0]
    assert r.usage.prompt_tokens == len(served.engine.encode(prompt))


def test_a_call_marker_that_is_a_special_token_reaches_the_parser(served, monkeypatch):
    """Mistral's [TOOL_CALLS] and Llama 3's <|python_tag|> are control tokens, which the text usually skips.
    SmolLM2 has no such marker, so this stands in a format whose markers are two of its special tokens."""
    fmt = ToolFormat("hermes", "<issue_start>", "<issue_closed>")
    monkeypatch.setattr(structured, "detect_format", lambda template: fmt)
    r = served.client.chat.completions.create(model=NAME, messages=ASK_WEATHER, max_tokens=80, temperature=0,
                                              tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None, c.message
    _call_args(c.message.tool_calls[0])


def test_token_stream_keeps_only_the_special_tokens_asked_for(served):
    eng = served.engine  # only its tokenizer: a TokenStream does no model work
    want = [8, *eng.encode("hi there"), 3, 10]       # <issue_start> hi there <repo_name> <issue_closed>

    def run(keep: tuple[int, ...]) -> str:
        ts = eng.token_stream(eng.encode("x"), SamplingParams(temperature=0), len(want))
        if keep:
            ts.keep_special(keep)
        text = ""
        for tok in want:
            logits = np.zeros(eng.n_token_ids, np.float32)
            logits[tok] = 1.0
            text += ts.push(logits)
        return text
    assert run(()) == "hi there"
    assert run((8, 10)) == "<issue_start>hi there<issue_closed>"


# ---- bad requests: 400 naming the field ----

BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "x": {"type": "strnig"}}}}}
BAD = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "foo"}}}}, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(("}, "strict": True}}}, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/completions", {"grammar": "root ::= foo"}, "grammar"),
    ("/v1/chat/completions", {"grammar": " "}, "grammar"),   # "" is llama-server's "no grammar"
    ("/v1/completions", {"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "json_schema"),
    ("/v1/chat/completions", {"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar"),
    ("/v1/chat/completions", {"grammar": 'root ::= "a"', "ignore_eos": True}, "ignore_eos"),
    ("/v1/chat/completions", {"tools": "get_weather"}, "tools"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name"),
    ("/v1/chat/completions", {"tools": [WEATHER, WEATHER]}, "tools"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("/v1/chat/completions", {"tools": [BAD_TOOL], "tool_choice": "required"}, "tools"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "grammar": 'root ::= "a"'}, "grammar"),
    ("/v1/completions", {"tools": [WEATHER]}, "tools"),
    ("/v1/completions", {"json_schema": json.loads('{"items": ' * 400 + "{}" + "}" * 400)}, "json_schema"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": json.loads(
        '{"items": ' * 400 + "{}" + "}" * 400)}}], "tool_choice": "required"}, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "21"}]},
     "messages[1].tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages[0].tool_calls[0].function.arguments"),
]


@pytest.mark.parametrize("path,extra,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_tools_schemas_and_grammars_are_400_naming_the_field(served, path, extra, param):
    body = {"max_tokens": 4, **({"prompt": "hi"} if path == "/v1/completions" else {"messages": ASK_WEATHER}), **extra}
    r = served.post(path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and f"'{param.split('.')[0]}" in err["message"], err
    assert err["type"] == "invalid_request_error" and "\n" not in err["message"]


def test_the_openai_client_raises_bad_request_for_a_bad_schema(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(model=NAME, messages=ASK_PERSON, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
