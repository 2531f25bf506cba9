"""Tool calls (runtime/toolcalls.py): rendering checked against transformers, parsing of each format at every
chunk boundary, tool_choice enforced by constrained decoding on the real SmolLM2 (numpy engine)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from vkpack.runtime.constrain import ConstraintCompiler, ConstraintError
from vkpack.runtime.toolcalls import (HERMES, LLAMA3, MISTRAL, ToolCall, ToolCallError, ToolCallStream, detect_format,
                                      parse_tool_calls, parse_tool_request, render_prompt, template_messages,
                                      tool_grammar)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather <in> a city & more",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp": 21}'},
]

# Small templates in the three formats' styles (written for these tests), rendered by vkpack and by transformers.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}Functions you may call:
{% for t in tools %}{{ t | tojson }}
{% endfor %}Call one as <tool_call>
{"name": ..., "arguments": ...}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages if m.role != 'system' %}
{%- if m.role == 'tool' %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}{% for c in m.tool_calls or [] %}<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>{% endfor %}<|im_end|>
{% endif %}
{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3_TEMPLATE = """{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}\
<|end_header_id|>

{% if loop.first and tools %}Call a function by answering {"name": name, "parameters": arguments}. Functions:
{% for t in tools %}{{ t.function | tojson(indent=2) }}
{% endfor %}{% endif %}{% if m.tool_calls %}{{ {"name": m.tool_calls[0].function.name, \
"parameters": m.tool_calls[0].function.arguments} | tojson }}{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}\
{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

MISTRAL_TEMPLATE = """{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{% if tools %}[AVAILABLE_TOOLS]\
{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]{% elif m.tool_calls %}[TOOL_CALLS]\
{{ m.tool_calls | map(attribute='function') | list | tojson }}{{ eos_token }}{% elif m.role == 'tool' %}[TOOL_RESULTS]\
{{ {"content": m.content, "call_id": m.tool_call_id} | tojson }}[/TOOL_RESULTS]{% elif m.role == 'system' %}\
{{ m.content }}
{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"""


@pytest.fixture(scope="module")
def engine(smollm2_archive):
    from vkpack.runtime.engine import Engine

    with Engine(smollm2_archive, device="numpy") as eng:
        yield eng


@pytest.fixture(scope="module")
def compiler(engine):
    return ConstraintCompiler.for_engine(engine)


@pytest.fixture(scope="module")
def hf_tokenizer(engine):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=engine.tokenizer, bos_token="<s>", eos_token="</s>")


# ---- rendering ----


@pytest.mark.parametrize("template, fmt", [(HERMES_TEMPLATE, HERMES), (LLAMA3_TEMPLATE, LLAMA3),
                                           (MISTRAL_TEMPLATE, MISTRAL)])
@pytest.mark.parametrize("choice", ["auto", "none"])
def test_tools_and_tool_messages_render_as_transformers_does(hf_tokenizer, template, fmt, choice):
    assert detect_format(template) is fmt
    req = parse_tool_request({"tools": [WEATHER, TIME], "tool_choice": choice})
    msgs = template_messages(CONVERSATION)
    ours = render_prompt({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}, msgs, req)
    ref = hf_tokenizer.apply_chat_template(msgs, tools=[WEATHER, TIME] if choice != "none" else None, tokenize=False,
                                           add_generation_prompt=True, chat_template=template)
    assert ours == ref
    assert ('"get_time"' in ours) == (choice != "none")    # "none": the tools are not shown
    assert '"city": "Paris"' in ours and "temp" in ours  # the earlier call and its result are
    assert "Current weather <in> a city & more" in ours or choice == "none"  # no HTML escaping


def test_a_template_without_tools_gets_them_in_the_hermes_format(engine):
    """SmolLM2's template ignores `tools`: they, the earlier calls and the results are written in as Hermes text."""
    req = parse_tool_request({"tools": [WEATHER]})
    text = render_prompt(engine.archive.tokenizer, template_messages(CONVERSATION), req)
    assert detect_format(engine.archive.tokenizer["chat_template"]) is HERMES
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call functions")
    assert json.dumps(WEATHER["function"]) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")
    none = render_prompt(engine.archive.tokenizer, template_messages(CONVERSATION),
                         parse_tool_request({"tools": [WEATHER], "tool_choice": "none"}))
    assert "You can call functions" not in none and "<tool_call>" in none


# ---- parsing ----

CASES = [
    (HERMES, ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n'),
     "I will check.", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>',
     None, [("get_weather", {"city": "Oslo"})]),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
    (HERMES, 'Bad: <tool_call>{"name": get_weather}</tool_call> done', 'Bad: <tool_call>{"name": get_weather}</tool_call> done',
     []),
    (HERMES, 'Text \n<tool_call>{"name": "get_weather", "arg', 'Text \n<tool_call>{"name": "get_weather", "arg', []),
    (HERMES, "Plain text with a < sign, <tool and <tool_call", "Plain text with a < sign, <tool and <tool_call", []),
    (HERMES, "  Leading and trailing space \n", "  Leading and trailing space \n", []),
    (LLAMA3, ' {"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    (LLAMA3, ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "get_time", '
             '"parameters": {"zone": "UTC"}}'), None, [("get_weather", {"city": "Lima"}), ("get_time", {"zone": "UTC"})]),
    (LLAMA3, 'The call is {"name": "get_weather", "parameters": {}}', 'The call is {"name": "get_weather", "parameters": {}}',
     []),
    (LLAMA3, '{"not": "a call"}', '{"not": "a call"}', []),
    (MISTRAL, ('Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
              '"arguments": {"zone": "UTC"}}]'), "Sure.", [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Bern"}, "id": "abcdefghi"}]', None,
     [("get_weather", {"city": "Bern"})]),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "argu', '[TOOL_CALLS][{"name": "get_weather", "argu', []),
]


def _calls(calls: list[ToolCall]) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_parse_whole_output(fmt, text, content, calls):
    got_content, got = parse_tool_calls(text, fmt)
    assert (got_content, _calls(got)) == (content, calls)
    for c in got:
        assert re.fullmatch(r"[A-Za-z0-9]{9}" if fmt is MISTRAL else r"call_[0-9a-f]{24}", c.id)
        assert c.delta_entry() == {"index": c.index, "id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": c.arguments}}
    assert [c.index for c in got] == list(range(len(got)))


def _streamed(fmt, chunks):
    stream = ToolCallStream(fmt)
    parts = [p for chunk in chunks for p in stream.feed(chunk)] + stream.finish()
    content = "".join(p for p in parts if isinstance(p, str))
    calls = [p for p in parts if isinstance(p, ToolCall)]
    return (None if calls and not content.strip() else content), calls


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_streaming_at_every_chunk_boundary(fmt, text, content, calls):
    for cut in range(len(text) + 1):
        got_content, got = _streamed(fmt, [text[:cut], text[cut:]])
        assert (got_content, _calls(got)) == (content, calls), cut
    got_content, got = _streamed(fmt, list(text))  # one character at a time
    assert (got_content, _calls(got)) == (content, calls)


def test_streaming_holds_back_only_what_may_be_a_call():
    s = ToolCallStream(HERMES)
    assert s.feed("Let me look.") == ["Let me look."]
    assert s.feed(" <tool_") == []                       # maybe a call: held
    assert s.feed("call>\n{\"name\": \"get_weather\", ") == []
    [call] = s.feed('"arguments": {"city": "Paris"}}\n</tool_call>')
    assert (call.name, call.arguments, call.index) == ("get_weather", '{"city": "Paris"}', 0)
    assert s.feed(" <tool") == []                         # after a call: the space is dropped, "<tool" held
    assert s.feed("tip> x") == ["<tooltip> x"]
    assert s.finish() == []


# ---- request validation ----


@pytest.mark.parametrize("body, param", [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_requests(body, param):
    with pytest.raises(ToolCallError) as e:
        parse_tool_request(body)
    assert e.value.param == param


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"type": "function"}]}], "messages[0].tool_calls[0]"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([], "messages"),
])
def test_bad_tool_messages(messages, param):
    with pytest.raises(ToolCallError) as e:
        template_messages(messages)
    assert e.value.param == param


def test_no_tools_means_no_tool_request():
    assert parse_tool_request({}) is None and parse_tool_request({"tools": [], "tool_choice": "none"}) is None
    req = parse_tool_request({"tools": [WEATHER]})
    assert req.choice == "auto" and req.active and not req.forced
    assert tool_grammar(req, HERMES, None) is None


# ---- tool_choice enforced by constrained decoding ----


def _decode(engine, prompt, constraint, max_tokens):
    ids = engine.encode(prompt)
    out = []
    with engine.kv_session(len(ids) + max_tokens) as kv:
        logits = engine.prefill(ids, kv, len(ids))[-1].copy()
        for _ in range(max_tokens):
            logits = constraint.apply(logits)
            tok = int(np.argmax(logits))
            if tok in engine.eos_ids:
                break
            constraint.accept(tok)
            out.append(tok)
            if constraint.finished:
                break
            logits = engine.executor.forward(np.asarray([tok]), len(ids) + len(out) - 1, kv)[-1].copy()
    return engine.decode(out)


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_choice_makes_a_valid_call(engine, compiler, choice):
    body = {"tools": [WEATHER, TIME], "tool_choice": choice, "parallel_tool_calls": False,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    req = parse_tool_request(body)
    prompt = render_prompt(engine.archive.tokenizer, template_messages(body["messages"]), req)
    fmt = detect_format(engine.archive.tokenizer["chat_template"])
    constraint = compiler.compile(tool_grammar(req, fmt, compiler))
    text = _decode(engine, prompt, constraint, 60)
    assert constraint.finished, text
    content, calls = parse_tool_calls(text, fmt)
    assert content is None and len(calls) == 1, text
    args = json.loads(calls[0].arguments)
    if calls[0].name == "get_weather":
        assert isinstance(args["city"], str)
    else:
        assert choice == "required" and calls[0].name == "get_time" and args["zone"] in ("UTC", "CET")


@pytest.mark.parametrize("fmt, good, bad", [
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', '{"name": "get_weather", "arguments"'),
    (MISTRAL, ('[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}, '
              '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'), ('[TOOL_CALLS][{"name": "get_time", '
              '"arguments": {"zone": "PST"')),
    (HERMES, ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n<tool_call>\n'
             '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'), 'Sure! <tool_call>'),
])
def test_tool_grammars_take_their_formats_calls_only(engine, compiler, fmt, good, bad):
    req = parse_tool_request({"tools": [WEATHER, TIME], "tool_choice": "required"})
    spec = tool_grammar(req, fmt, compiler)
    c = compiler.compile(spec)
    for tok in engine.encode(good):
        c.accept(tok)
    assert c.complete
    c = compiler.compile(spec)
    with pytest.raises(ConstraintError):
        for tok in engine.encode(bad):
            c.accept(tok)


def test_a_bad_tool_schema_is_refused_when_forced(compiler):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "strnig"}}}}}
    req = parse_tool_request({"tools": [tool], "tool_choice": "required"})
    with pytest.raises(ConstraintError, match="strnig") as e:
        compiler.compile(tool_grammar(req, HERMES, compiler))
    assert e.value.param == "tools"
