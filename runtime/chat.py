"""Chat templates from the archive, rendered in a sandboxed child process: a template is untrusted input.

Jinja2's immutable sandbox refuses attribute access to Python internals (`__class__`,
`__globals__`, ...) and mutation of passed-in objects, so a template can only produce text. But
it can still spend unbounded CPU (nested `range` loops) and memory (`'A' * 10**10`, a string
doubled in a loop, `center(10**10)`), which no check inside the interpreter stops before the
allocation. So the template renders in a child process with an address-space limit
(RENDER_MEMORY), a wall-clock limit (RENDER_SECONDS, after which the child is killed) and an
output limit (RENDER_MAX_CHARS); every failure is one TemplateError. The child is started once
and reused, so a render costs a pipe round trip.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from ..pack_format.errors import VkpackError

RENDER_SECONDS = 2.0          # wall-clock limit of one render (real templates take milliseconds)
RENDER_MEMORY = 1 << 30       # the renderer's address space (RLIMIT_AS), bytes
RENDER_MAX_CHARS = 1 << 22    # characters of rendered text
START_SECONDS = 60.0          # starting the renderer (a Python interpreter and jinja2)
_LEN = struct.Struct("<Q")
_USER = "chat template: "     # prefix of errors the template raised on purpose (raise_exception)


class TemplateError(VkpackError):
    """The chat template is missing, invalid, too slow or too large, or tried something the sandbox forbids."""


def render_chat(tok: dict[str, Any], messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation through the archive's chat template (TemplateError on any failure).

    `tools` (OpenAI's list of {"type": "function", "function": {...}}) reaches the template as `tools`,
    as transformers passes it; without tools the name stays undefined, so `tools is defined` tests hold.
    """
    source = tok.get("chat_template")
    if not source:
        raise TemplateError("the archive has no chat template")
    request = {"source": source, "messages": messages, "add_generation_prompt": bool(add_generation_prompt),
               "bos_token": tok.get("bos_token") or "", "eos_token": tok.get("eos_token") or ""}
    if tools:
        request["tools"] = tools
    return _RENDERER.render(request)


class _Renderer:
    """One reusable child process; a render that overruns its time is killed with the child."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def render(self, request: dict[str, Any]) -> str:
        payload = json.dumps(request).encode()
        with self.lock:
            proc = self._ensure()
            try:
                os.write(proc.stdin.fileno(), _LEN.pack(len(payload)))
                _write_all(proc.stdin.fileno(), payload)
                answer = _read_frame(proc.stdout.fileno(), time.monotonic() + RENDER_SECONDS)
            except TimeoutError:
                self._kill()
                raise TemplateError(f"chat template refused: rendering took more than {RENDER_SECONDS:g} s") from None
            except (OSError, EOFError):
                self._kill()
                raise TemplateError("chat template refused: the renderer ran out of its "
                                    f"{RENDER_MEMORY >> 20} MiB memory limit") from None
        reply = json.loads(answer)
        if "error" in reply:
            raise TemplateError(reply["error"])
        return reply["text"]

    def _ensure(self) -> subprocess.Popen:
        if self.proc is not None and self.proc.poll() is None:
            return self.proc
        self.proc = subprocess.Popen([sys.executable, "-c", "from vkpack.runtime.chat import serve_renders; serve_renders()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     close_fds=True)
        try:
            if _read_frame(self.proc.stdout.fileno(), time.monotonic() + START_SECONDS) != b"ready":
                raise EOFError
        except (TimeoutError, EOFError, OSError):
            self._kill()
            raise TemplateError("the chat template renderer did not start") from None
        return self.proc

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
            self.proc = None


_RENDERER = _Renderer()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None) -> bytes:
    (n,) = _LEN.unpack(_read_exact(fd, _LEN.size, deadline))
    return _read_exact(fd, n, deadline)


def _send(fd: int, data: bytes) -> None:
    _write_all(fd, _LEN.pack(len(data)) + data)


# ---- the child ----
def serve_renders() -> None:
    """The renderer's loop (in the child): limits set once, then one request frame -> one reply frame."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (RENDER_MEMORY, RENDER_MEMORY))
    sys.setrecursionlimit(2000)
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: F401  (imported before "ready")

    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    _send(out, b"ready")
    while True:
        try:
            request = json.loads(_read_frame(inp, None))
        except EOFError:
            return
        try:
            reply = {"text": _render_here(request)}
        except TemplateError as e:
            reply = {"error": str(e)[:500]}
        except MemoryError:
            reply = {"error": f"chat template refused: it needs more than the renderer's {RENDER_MEMORY >> 20} MiB"}
        except RecursionError:
            reply = {"error": "chat template refused: recursion too deep"}
        except Exception as e:  # whatever the template did, the answer is one error line
            reply = {"error": f"chat template failed: {type(e).__name__}: {str(e)[:300]}"}
        _send(out, json.dumps(reply).encode())


def _render_here(request: dict[str, Any]) -> str:
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    def raise_exception(msg: str) -> None:
        raise TemplateError(f"{_USER}{msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = _tojson
    env.globals["strftime_now"] = _strftime_now   # Llama 3.x templates date the system prompt with it
    try:
        template = env.from_string(request["source"])
        pieces, size = [], 0
        extra = {"tools": request["tools"]} if "tools" in request else {}
        for piece in template.generate(messages=request["messages"], add_generation_prompt=request["add_generation_prompt"],
                                       bos_token=request["bos_token"], eos_token=request["eos_token"], **extra):
            size += len(piece)
            if size > RENDER_MAX_CHARS:
                raise TemplateError(f"chat template refused: it renders more than {RENDER_MAX_CHARS} characters")
            pieces.append(piece)
    except SecurityError as e:
        raise TemplateError(f"chat template refused by the sandbox: {e}") from None
    except OverflowError as e:  # the sandbox's range cap, or a number too large
        raise TemplateError(f"chat template refused: {e}") from None
    except JinjaError as e:
        raise TemplateError(f"chat template failed: {e}") from None
    return "".join(pieces)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson`, which templates are written for: plain JSON in the given key order. Jinja's
    own sorts keys and escapes `<>&'` for HTML, so tools and call arguments would reach the model altered."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=tuple(separators) if separators else None, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """transformers' `strftime_now`: the local time in `fmt`."""
    import datetime

    return datetime.datetime.now().strftime(str(fmt)[:200])
