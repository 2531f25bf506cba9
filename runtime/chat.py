"""Chat templates from the archive, rendered in Jinja2's sandbox: a template is untrusted input.

The immutable sandbox refuses attribute access to Python internals (`__class__`, `__globals__`,
...) and mutation of passed-in objects, so a malicious template can only produce text.
"""

from __future__ import annotations

from typing import Any

from ..pack_format.errors import VkpackError


class TemplateError(VkpackError):
    """The chat template is missing, invalid, or tried something the sandbox forbids."""


def render_chat(tok: dict[str, Any], messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    source = tok.get("chat_template")
    if not source:
        raise TemplateError("the archive has no chat template")

    def raise_exception(msg: str) -> None:
        raise TemplateError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(source)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=tok.get("bos_token") or "", eos_token=tok.get("eos_token") or "")
    except SecurityError as e:
        raise TemplateError(f"chat template refused by the sandbox: {e}") from None
    except JinjaError as e:
        raise TemplateError(f"chat template failed: {e}") from None
