"""Chat templates rendered with jinja2 in a sandbox (templates come from checkpoints and are untrusted)."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import time
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsv2cli.errors import InputError

# DeepSeek-V2-Chat's template (spec §7): used when a checkpoint ships none.
DEEPSEEK_V2_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")


def _raise(message: str) -> None:
    raise TemplateError(message)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InputError("'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(
                f"bad chat message {m!r}", hint=f"each message needs a role ({', '.join(ROLES)}) and a string content"
            )
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


# A rendered prompt longer than this cannot fit any model's context; rendering stops there.
MAX_RENDER_CHARS = 4 << 20
MAX_RENDER_SECONDS = 10.0
MAX_RENDER_MEMORY = 1 << 30  # bytes the rendering process may allocate beyond what it holds already


def render_chat(
    template: str,
    messages: list[dict[str, str]],
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
) -> str:
    """Render ``messages`` with ``template`` in an immutable jinja2 sandbox, bounded in output, time and memory.

    The template comes from a checkpoint: it renders in a forked child with a memory limit and a
    deadline, and any failure (an exception, a limit, the child dying) is one :class:`InputError`.
    """
    if not isinstance(template, str):
        raise InputError("the chat template is not a string", hint="the checkpoint's chat_template may be broken")
    variables = {
        "messages": messages,
        "bos_token": bos_token or "",
        "eos_token": eos_token or "",
        "add_generation_prompt": add_generation_prompt,
    }
    if not hasattr(os, "fork"):  # pragma: no cover - not on Linux: output size bounded, time and memory not
        status, text = _render(template, variables)
    else:
        status, text = _render_in_child(template, variables)
    if status != "ok":
        raise InputError(f"the chat template failed: {text}", hint="the checkpoint's chat_template may be broken")
    return text


def _render(template: str, variables: dict[str, Any]) -> tuple[str, str]:
    """("ok", text) or ("error", reason)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    pieces, size = [], 0
    try:
        for piece in env.from_string(template).generate(**variables):
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                return "error", f"its output is longer than {MAX_RENDER_CHARS:,} characters"
            pieces.append(piece)
    except MemoryError:
        return "error", f"it needs more than {MAX_RENDER_MEMORY >> 20} MiB of memory"
    except RecursionError:
        return "error", "it recurses too deeply"
    except Exception as exc:  # jinja2's errors, and whatever the template's expressions raise (1/0, range(10**9), ...)
        return "error", f"{type(exc).__name__}: {str(exc)[:200]}"
    return "ok", "".join(pieces)


def _render_in_child(template: str, variables: dict[str, Any]) -> tuple[str, str]:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: render, send the result, exit without running the parent's cleanup
        try:
            os.close(read_end)
            _limit_memory()
            data = json.dumps(_render(template, variables)).encode("utf-8", "surrogatepass")
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view) :]
        finally:
            os._exit(0)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + MAX_RENDER_SECONDS
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                return "error", f"it takes longer than {MAX_RENDER_SECONDS:g} s"
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    try:
        status, text = json.loads(b"".join(chunks).decode("utf-8", "surrogatepass"))
    except ValueError:
        return "error", "rendering it stopped the process (out of memory?)"
    return status, text


def _limit_memory() -> None:
    """Cap the child's address space at what it maps now plus :data:`MAX_RENDER_MEMORY`."""
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + MAX_RENDER_MEMORY, resource.RLIM_INFINITY))
    except (OSError, ValueError):
        pass
