"""Tools and constrained output for the handlers: what a request asks of its output's shape, and each
choice's text turned back into tool calls.

Request side (`output_plan`, run on a worker thread: compiling a grammar takes about 1 ms, and the first
one builds the tokenizer's table for llguidance, under a second): `tools` / `tool_choice` (chat only) and
`response_format` / `grammar` / `json_schema` (both endpoints) become one `OutputPlan`, with a compiled
constraint per choice for the scheduler's LogitsMask hook (runtime/constrain.py, runtime/toolcalls.py).
Response side (`ToolRelay`): each choice's text through its format's parser, as stream deltas or a message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..constrain import ConstraintCompiler, ConstraintError, TokenConstraint, grammar_from_request
from ..toolcalls import (
    ToolCall, ToolCallError, ToolCallStream, ToolFormat, ToolRequest, detect_format, parse_tool_calls, parse_tool_request,
    tool_grammar,
)
from .parse import ApiError


@dataclass
class OutputPlan:
    """`tools`: the request's tools (None without any; `tools.active` is False for tool_choice "none");
    `fmt`: the tool-call format the chat template teaches; `masks`: one compiled constraint per choice,
    or none; `keep`: ids of special tokens that spell the format's call markers, kept in the text."""

    tools: ToolRequest | None = None
    fmt: ToolFormat | None = None
    masks: list[TokenConstraint] = field(default_factory=list)
    keep: tuple[int, ...] = ()

    @property
    def parse_calls(self) -> bool:
        return self.tools is not None and self.tools.active

    def mask_factory(self) -> Callable[[], TokenConstraint] | None:
        """GenRequest.logits_mask: the scheduler calls it once per choice, when the request is submitted."""
        return iter(self.masks).__next__ if self.masks else None


def output_plan(body: dict[str, Any], n: int, compiler: ConstraintCompiler, template: str | None,
                chat: bool) -> OutputPlan:
    """The request's tools and grammar, checked and compiled; ApiError 400 naming the field otherwise."""
    try:
        return _plan(body, n, compiler, template, chat)
    except (ToolCallError, ConstraintError) as e:
        raise ApiError(400, str(e), param=e.param) from None


def _plan(body: dict[str, Any], n: int, compiler: ConstraintCompiler, template: str | None, chat: bool) -> OutputPlan:
    tools = parse_tool_request(body)
    if tools is not None and not chat:
        raise ApiError(400, "'tools' is only supported on /v1/chat/completions", param="tools")
    plan = OutputPlan(tools)
    spec = grammar_from_request(body)
    if tools is not None and tools.active:
        plan.fmt = detect_format(template)
        plan.keep = tuple(i for i in (compiler.special_token_id(m) for m in (plan.fmt.start, plan.fmt.end) if m)
                          if i is not None)
        if tools.forced:
            if spec is not None:
                name = spec.param.split(".")[0]  # response_format, grammar or json_schema
                raise ApiError(400, f"'{name}' cannot be combined with a forced 'tool_choice' (the output must be "
                                    "tool calls)", param=name)
            spec = tool_grammar(tools, plan.fmt, compiler)
    if spec is None:
        return plan
    if body.get("ignore_eos") is True:
        # the grammar ends the output with EOS; ignoring it would run on past the end of the grammar
        raise ApiError(400, "'ignore_eos' cannot be combined with a grammar or forced tool calls", param="ignore_eos")
    plan.masks = [compiler.compile(spec) for _ in range(n)]
    return plan


class ToolRelay:
    """The choices' texts through the tool-call parser of `fmt`; without a format the text passes as it is."""

    def __init__(self, fmt: ToolFormat | None, n: int):
        self.fmt = fmt
        self.streams = [ToolCallStream(fmt) for _ in range(n)] if fmt is not None else []

    def feed(self, index: int, text: str) -> list[dict[str, Any]]:
        """Stream deltas for choice `index`'s next piece: `{"content"}` and `{"tool_calls": [call]}`s
        (none while a possible call is held back)."""
        if self.fmt is None:
            return [{"content": text}]
        return [_delta(p) for p in self.streams[index].feed(text)]

    def finish(self, index: int, reason: str) -> tuple[list[dict[str, Any]], str]:
        """Choice `index`'s held-back rest as deltas, and its finish_reason ("tool_calls" if it made calls)."""
        if self.fmt is None:
            return [], reason
        stream = self.streams[index]
        rest = [_delta(p) for p in stream.finish()]
        return rest, _reason(reason, stream.calls)

    def message(self, text: str, reason: str) -> tuple[dict[str, Any], str]:
        """A whole choice's `message` and finish_reason: content null when the output was only calls."""
        if self.fmt is None:
            return {"role": "assistant", "content": text}, reason
        content, calls = parse_tool_calls(text, self.fmt)
        if not calls:
            return {"role": "assistant", "content": content}, reason
        return ({"role": "assistant", "content": content, "tool_calls": [c.message_entry() for c in calls]},
                _reason(reason, calls))


def _delta(part: str | ToolCall) -> dict[str, Any]:
    return {"content": part} if isinstance(part, str) else {"tool_calls": [part.delta_entry()]}


def _reason(reason: str, calls: list[ToolCall]) -> str:
    # a call cut off by max_tokens stays "length", as OpenAI reports it
    return "tool_calls" if calls and reason == "stop" else reason
