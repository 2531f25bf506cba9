"""Tool calls: OpenAI `tools` through the model's own chat template, and the model's calls parsed back.

A model calls tools in the text format it was trained on, which its chat template shows. Three cover
most open models: Hermes/Qwen (`<tool_call>{"name", "arguments"}</tool_call>`, repeatable), Llama 3
(a bare `{"name", "parameters"}` object, perhaps after `<|python_tag|>`) and Mistral
(`[TOOL_CALLS][{"name", "arguments"}, ...]`). `detect_format` picks one from what the template emits;
a template that ignores `tools` (SmolLM2's) gets them described in a system message in the Hermes
format, as llama-server does for templates without tool support. `tool_choice` "required" or a named
function is enforced by a grammar of the format's calls (`tool_grammar`, see runtime/constrain.py);
"none" neither renders the tools nor parses calls; "auto" renders and parses.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from ..pack_format.errors import VkpackError
from .chat import TemplateError, render_chat
from .constrain import (
    JSON_WHITESPACE, ConstraintCompiler, ConstraintError, GrammarSpec, closed_objects, lark_grammar,
)

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")   # OpenAI's rule for function names


class ToolCallError(VkpackError, ValueError):
    """A bad `tools`, `tool_choice` or tool message; `param` names the field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# ---- formats ----


@dataclass(frozen=True)
class ToolFormat:
    """How one family of models writes calls: `start` opens a call (or the list of calls), `end` closes
    one (Hermes only), `args_key` names the arguments in the call object."""

    name: str
    start: str
    end: str = ""
    args_key: str = "arguments"


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>")
LLAMA3 = ToolFormat("llama3", "<|python_tag|>", args_key="parameters")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]")


def detect_format(template: str | None) -> ToolFormat:
    """The format a chat template teaches, from the markers it emits; Hermes when it shows none."""
    src = template or ""
    if "[TOOL_CALLS]" in src:
        return MISTRAL
    if "<tool_call>" in src:
        return HERMES
    if "<|python_tag|>" in src or ("<|start_header_id|>" in src and "parameters" in src):
        return LLAMA3
    return HERMES


def template_renders_tools(template: str | None) -> bool:
    return "tools" in (template or "")


# ---- the request: tools, tool_choice, messages ----


@dataclass(frozen=True)
class ToolRequest:
    """A request's validated tools. `choice` is "none", "auto", "required" or "function" (then `function`
    names it); `parallel` is OpenAI's parallel_tool_calls."""

    tools: list[dict[str, Any]]
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether tools are rendered and calls parsed ("none" does neither)."""
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the output must be calls, enforced by a grammar."""
        return self.choice in ("required", "function")


def parse_tool_request(body: dict[str, Any]) -> ToolRequest | None:
    """`tools`, `tool_choice` and `parallel_tool_calls` of a chat request; None without tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ToolCallError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolCallError("'tools' must be an array", "tools")
    if len(tools) > MAX_TOOLS:
        raise ToolCallError(f"'tools' has {len(tools)} entries; at most {MAX_TOOLS}", "tools")
    names = [_check_tool(t, i) for i, t in enumerate(tools)]
    if len(set(names)) != len(names):
        raise ToolCallError("'tools' names a function twice", "tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolCallError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if choice is None or choice in ("none", "auto", "required"):
        return ToolRequest(tools, choice or "auto", None, parallel)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise ToolCallError(f"'tool_choice' names function {json.dumps(name)[:80]}, which 'tools' does not have",
                                "tool_choice")
        return ToolRequest(tools, "function", name, parallel)
    raise ToolCallError("'tool_choice' must be 'none', 'auto', 'required' or "
                        '{"type": "function", "function": {"name": ...}}', "tool_choice")


def _check_tool(tool: Any, i: int) -> str:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolCallError(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}", where)
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ToolCallError(f"'{where}.function.name' must be 1-64 letters, digits, '_', '.' or '-'",
                            f"{where}.function.name")
    if not isinstance(fn.get("description", ""), str):
        raise ToolCallError(f"'{where}.function.description' must be a string", f"{where}.function.description")
    if not isinstance(fn.get("parameters", {}), dict):
        raise ToolCallError(f"'{where}.function.parameters' must be a JSON schema object", f"{where}.function.parameters")
    return name


def template_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as chat templates take them: text content, assistant `tool_calls` with
    `arguments` as an object (templates write it with `tojson`), `tool` messages with `tool_call_id`."""
    if not isinstance(messages, list) or not messages:
        raise ToolCallError("'messages' must be a non-empty array", "messages")
    return [_template_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _template_message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise ToolCallError(f"'{where}' must be an object", where)
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise ToolCallError(f"'{where}.role' must be a non-empty string", f"{where}.role")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _text(m.get("content"), where)}
    if role == "assistant" and m.get("tool_calls"):
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            raise ToolCallError(f"'{where}.tool_calls' must be an array", f"{where}.tool_calls")
        out["tool_calls"] = [_template_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    if role == "tool":
        tid = m.get("tool_call_id")
        if not isinstance(tid, str):
            raise ToolCallError(f"'{where}.tool_call_id' must be a string", f"{where}.tool_call_id")
        out["tool_call_id"] = tid
    if isinstance(m.get("name"), str):
        out["name"] = m["name"]
    return out


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ToolCallError(f"'{where}.content' must be a string or an array of text parts", f"{where}.content")


def _template_call(c: Any, where: str) -> dict[str, Any]:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolCallError(f"'{where}' must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                            "\"arguments\"}}}}", where)
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise ToolCallError(f"'{where}.function.arguments' is not JSON", f"{where}.function.arguments") from None
    call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(c.get("id"), str):
        call["id"] = c["id"]
    return call


# ---- rendering ----


def render_prompt(tok: dict[str, Any], messages: list[dict[str, Any]], req: ToolRequest | None) -> str:
    """The conversation (from `template_messages`) through the archive's chat template, with the tools
    when `req` is active. A template that does not render tools gets them, and any earlier calls and
    results, written in the Hermes format it lacks."""
    source = tok.get("chat_template") or ""
    tools = req.tools if req is not None and req.active else None
    if template_renders_tools(source):
        return render_chat(tok, messages, tools=tools)
    msgs = [_hermes_text(m) for m in messages]
    if tools:
        msgs = _with_tool_prompt(msgs, tools)
    try:
        return render_chat(tok, msgs)
    except TemplateError:
        if not tools or msgs[0]["role"] != "system":
            raise
        # a template that refuses system messages: the tool prompt opens the first user message instead
        rest = msgs[1:]
        if rest and rest[0]["role"] == "user":
            rest = [{**rest[0], "content": msgs[0]["content"] + "\n\n" + rest[0]["content"]}, *rest[1:]]
        return render_chat(tok, rest)


def _hermes_text(m: dict[str, Any]) -> dict[str, Any]:
    if m.get("tool_calls"):
        calls = "\n".join(HERMES.start + "\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]
                                                            ["arguments"]}, ensure_ascii=False) + "\n" + HERMES.end
                          for c in m["tool_calls"])
        return {"role": m["role"], "content": (m["content"] + "\n" if m["content"] else "") + calls}
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    return {"role": m["role"], "content": m["content"]}


def _with_tool_prompt(msgs: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    prompt = ("You can call functions to answer. They are described by these JSON schemas:\n<tools>\n"
              f"{listing}\n</tools>\nTo call functions, reply with one block per call, exactly like this:\n"
              '<tool_call>\n{"name": "function name", "arguments": {"argument": "value"}}\n</tool_call>')
    if msgs[0]["role"] == "system":
        return [{"role": "system", "content": msgs[0]["content"] + "\n\n" + prompt}, *msgs[1:]]
    return [{"role": "system", "content": prompt}, *msgs]


# ---- tool_choice "required" / a named function: a grammar of calls ----


def tool_grammar(req: ToolRequest, fmt: ToolFormat, compiler: ConstraintCompiler) -> GrammarSpec | None:
    """The grammar that makes the output nothing but calls in `fmt`, to the chosen functions with
    arguments valid against their schemas; None unless `req` forces calls."""
    if not req.forced:
        return None
    try:
        return lark_grammar(_calls_lark(req, fmt, compiler), "tools")
    except RecursionError:
        raise ConstraintError("'tools' has a parameters schema nested too deeply", "tools") from None


def _calls_lark(req: ToolRequest, fmt: ToolFormat, compiler: ConstraintCompiler) -> str:
    tools = [t for t in req.tools if req.function is None or t["function"]["name"] == req.function]
    options = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        fmt.args_key: closed_objects(t["function"].get("parameters") or {"type": "object"})},
        "required": ["name", fmt.args_key], "additionalProperties": False} for t in tools]
    guidance = {"whitespace_pattern": JSON_WHITESPACE, "lenient": True}
    several = req.parallel and req.function is None
    if fmt is MISTRAL:
        array = {"type": "array", "items": {"anyOf": options}, "minItems": 1, **({} if several else {"maxItems": 1})}
        lark = f"start: {compiler.literal(fmt.start)} %json {json.dumps({**array, 'x-guidance': guidance})}\n"
    elif fmt is LLAMA3:  # one call: Llama 3 writes a single JSON object
        lark = f"start: %json {json.dumps({'anyOf': options, 'x-guidance': guidance})}\n"
    else:  # Hermes: <tool_call>\n{...}\n</tool_call>, calls one per line
        call = json.dumps({"anyOf": options, "x-guidance": guidance})
        more = ' ("\\n" call)*' if several else ""
        lark = (f"start: call{more}\n"
                f'call: {compiler.literal(fmt.start)} "\\n" %json {call} "\\n" {compiler.literal(fmt.end)}\n')
    return lark


# ---- parsing the output ----


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; `arguments` is a JSON object's text, as OpenAI sends it."""

    index: int
    id: str
    name: str
    arguments: str

    def message_entry(self) -> dict[str, Any]:
        """The entry of `message.tool_calls`."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def delta_entry(self) -> dict[str, Any]:
        """The entry of a streamed `delta.tool_calls` (the whole call in one piece)."""
        return {"index": self.index, **self.message_entry()}


def new_call_id(fmt: ToolFormat) -> str:
    """OpenAI's `call_...`; Mistral's templates require 9 letters and digits, so those get that."""
    if fmt is MISTRAL:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return "call_" + secrets.token_hex(12)


class ToolCallStream:
    """Streaming parser: `feed(text)` returns what can be sent now, content strings and whole
    `ToolCall`s, holding back text that may still become a call; `finish()` returns the rest.
    Parsing a whole output is one `feed` and `finish` (`parse_tool_calls`), so a stream and a
    non-streamed response agree, whatever the chunk boundaries.

    Text around calls: whitespace next to a call is dropped; a call that does not parse (malformed
    JSON, a missing name) stays in the content, as vLLM and llama-server leave it.
    """

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.calls: list[ToolCall] = []
        self._buf = ""            # text not yet sent: a possible marker, a call being read, held whitespace
        self._in_call = False     # inside a call's text (after its start marker, or Llama 3's opening '{')
        self._started = False     # any non-whitespace seen (Llama 3 calls must open the output)
        self._after_call = False  # whitespace here follows a call: dropped
        self._gap = ""            # whitespace taken off before the call being read (given back if it fails)

    def feed(self, text: str) -> list[str | ToolCall]:
        self._buf += text
        out: list[str | ToolCall] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[str | ToolCall]:
        """The held-back rest, at the end of the output: an unclosed call that parses counts as a call."""
        out: list[str | ToolCall] = []
        if self._in_call:
            calls = self._calls(self._buf.removeprefix(self.fmt.start).strip())
            if calls is not None:
                out += calls
            else:
                out.append(self._gap + self._buf)
        else:
            self._emit_text(self._buf.rstrip() if self.calls else self._buf, out)
        self._buf, self._in_call = "", False
        return [o for o in out if o != ""]

    # ---- one step: returns whether to go on ----
    def _step(self, out: list[str | ToolCall]) -> bool:
        fmt = self.fmt
        if self._in_call:
            if not fmt.end:          # Llama 3 and Mistral calls run to the end of the output
                return False
            close = self._buf.find(fmt.end)
            if close < 0:
                return False
            body = self._buf[len(fmt.start):close]
            calls = self._calls(body.strip())
            out.extend(calls if calls is not None else [self._gap + self._buf[:close + len(fmt.end)]])
            self._buf, self._in_call = self._buf[close + len(fmt.end):], False
            return True
        if fmt is LLAMA3 and not self._started:
            lead = self._buf.lstrip()
            if not lead or fmt.start.startswith(lead):
                return False     # only whitespace yet, or a prefix of <|python_tag|>
            self._started = True
            if lead.startswith(("{", fmt.start)):
                self._buf, self._in_call = lead, True
                return False
        hit = self._buf.find(fmt.start) if fmt is not LLAMA3 else -1
        if hit >= 0:
            before = self._buf[:hit]
            self._emit_text(before.rstrip(), out)
            self._gap = "" if self._after_call else before[len(before.rstrip()):]
            self._buf, self._in_call = self._buf[hit:], True
            return True
        # hold back a tail that may begin a marker, and trailing whitespace that may precede one
        keep = _marker_prefix_len(self._buf, fmt.start) if fmt is not LLAMA3 else 0
        sendable, tail = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        body = sendable.rstrip()
        self._emit_text(body, out)
        self._buf = sendable[len(body):] + tail
        return False

    def _emit_text(self, text: str, out: list[str | ToolCall]) -> None:
        if self._after_call:
            text = text.lstrip()
        if text:
            self._started, self._after_call = True, False
            out.append(text)

    def _calls(self, body: str) -> list[ToolCall] | None:
        """The calls in one call region, or None when it does not parse as the format's calls."""
        fmt = self.fmt
        if fmt is LLAMA3:
            body = body.removeprefix(fmt.start).strip()
            objs = _json_values(body, sep=";")
        elif fmt is MISTRAL:
            objs = _json_values(body, sep="")
            objs = objs[0] if objs is not None and len(objs) == 1 and isinstance(objs[0], list) else objs
        else:
            objs = _json_values(body, sep="")
        if not objs:
            return None
        parsed = [_call_fields(o) for o in objs]
        if any(p is None for p in parsed):
            return None
        calls = []
        for name, args in parsed:  # type: ignore[misc]
            calls.append(ToolCall(len(self.calls), new_call_id(fmt), name, args))
            self.calls.append(calls[-1])
        self._after_call = True
        return calls


def parse_tool_calls(text: str, fmt: ToolFormat) -> tuple[str | None, list[ToolCall]]:
    """A whole output as (content, calls); content is None when the output was calls alone."""
    stream = ToolCallStream(fmt)
    parts = stream.feed(text) + stream.finish()
    content = "".join(p for p in parts if isinstance(p, str))
    if stream.calls and not content.strip():
        return None, stream.calls
    return content, stream.calls


def _marker_prefix_len(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _json_values(text: str, sep: str) -> list[Any] | None:
    """Consecutive JSON values filling `text` (separated by whitespace and `sep`), or None."""
    dec = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or (sep and text[i] == sep and values)):
            i += 1
        if i == len(text):
            return values
        try:
            v, i = dec.raw_decode(text, i)
        except (ValueError, RecursionError):
            return None
        values.append(v)


def _call_fields(obj: Any) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one call object, in any of the formats' spellings."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):      # {"type": "function", "function": {...}}, as some models write
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)
