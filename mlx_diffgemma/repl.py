"""The terminal chat: a REPL over ``ChatSession`` that shows each canvas denoising live."""

from __future__ import annotations

import json
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from .chat import ChatSession
from .generate import GenerationResponse, fitting_tokens, resolve_settings, stream_generate
from .reply import Markers, Reply, parse_reply
from .vision import ImageError, read_image

HELP = """Commands:
  /reset               forget the conversation
  /system <text>       set the system prompt (starts a new conversation)
  /think               turn thinking on or off for the next turns
  /image <path>        attach an image to your next message (repeat for several)
  /tool-result <json>  answer the last reply's tool call with a result; the model goes on
  /stats               speed and denoising statistics of the last reply
  /save <file>         write the conversation as JSON
  /help                this list
  /exit                quit (or Ctrl-D)
Ctrl-C stops a reply at its next update (twice: at once); the conversation keeps what was said."""
# Terminal control characters (C0 but newline and tab, DEL, C1): model output could move the
# cursor, recolour or clear the screen, or ring the bell with them.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
Generator = Callable[..., Iterator[GenerationResponse]]


class ContextFull(ValueError):
    """The model's context has no room left for the reply asked for."""


def fit_context(generator: Generator, default_max_tokens: int) -> Generator:
    """``generator`` (``stream_generate`` or ``Lockstep.stream``, on token ids) where
    ``max_tokens=None`` is ``default_max_tokens``, or fewer when the context holds fewer after
    the prompt; a reply that cannot fit is refused with ``ContextFull``."""

    def stream(model, tokenizer, prompt: list[int], max_tokens: int | None = None, *, canvas_length: int | None = None,
               **options: Any) -> Iterator[GenerationResponse]:
        canvas = resolve_settings(model, canvas_length=canvas_length).canvas_length
        room = fitting_tokens(model, len(prompt), canvas)
        if max_tokens is None:
            max_tokens = min(default_max_tokens, room)
        if room == 0 or max_tokens > room:
            left = "no room for a reply" if room == 0 else f"room for {room} new tokens, not the {max_tokens} asked for"
            raise ContextFull(f"{len(prompt)} prompt tokens leave {left} in the model's context of "
                              f"{model.args.max_position_embeddings} tokens (filled in canvases of {canvas})")
        return generator(model, tokenizer, prompt, max_tokens=max_tokens, canvas_length=canvas_length, **options)

    return stream


def printable(text: str) -> str:
    """``text`` with terminal control characters shown escaped (``\\x1b``) instead of acted on."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_stats(r: GenerationResponse) -> str:
    steps = r.steps_per_canvas
    mean_steps = sum(steps) / len(steps) if steps else 0.0
    return (
        f"prompt: {plural(r.prompt_tokens, 'token')}, {r.prompt_tps:.1f} tokens/s | "
        f"generation: {plural(r.generation_tokens, 'token')}, {r.generation_tps:.1f} tokens/s | "
        f"{mean_steps:.1f} steps/canvas, {r.tokens_per_forward:.2f} tokens/forward | "
        f"peak memory {r.peak_memory * 1e3:.1f} MB"
    )


def format_call(call: dict[str, Any]) -> str:
    """A tool call as it reads in code: ``get_weather(location="Paris")``."""
    arguments = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in call["arguments"].items())
    return f"{call['name']}({arguments})"


def render(reply: Reply, draft: Reply | None = None) -> Group:
    """The reply so far: the reasoning dimmed while it streams, one dimmed line once the answer
    or a tool call starts; the answer; tool calls; and the settling draft's new text, dimmed.
    ``draft`` is the whole reply as the live canvas would complete it."""
    parts = []
    if reply.reasoning and not (reply.answer or reply.tool_calls):
        parts.append(Text(printable(reply.reasoning), style="dim italic"))
    elif reply.reasoning:
        parts.append(Text(f"thought for {plural(len(reply.reasoning.split()), 'word')}", style="dim"))
    if reply.answer:
        parts.append(Text(printable(reply.answer)))
    parts += [Text(f"→ {printable(format_call(call))}", style="cyan") for call in reply.tool_calls]
    if draft is not None and draft.answer.startswith(reply.answer) and draft.answer != reply.answer:
        parts.append(Text(printable(draft.answer[len(reply.answer):]), style="dim"))
    elif draft is not None and draft.reasoning.startswith(reply.reasoning) and draft.reasoning != reply.reasoning:
        parts.append(Text(printable(draft.reasoning[len(reply.reasoning):]), style="dim italic"))
    return Group(*parts)


class Repl:
    """With ``sharded`` (under ``mlx.launch``) Ctrl-C ends the session: it reaches every rank
    and stops the launcher's forwarding of input, so the reply stops at the next update,
    where all ranks agree, and the chat exits, releasing the other ranks."""

    def __init__(self, session: ChatSession, console: Console, draft: bool = True, sharded: bool = False,
                 enable_thinking: bool | None = None):
        self.session, self.console, self.draft, self.sharded = session, console, draft, sharded
        self.enable_thinking = enable_thinking  # None: as the chat template decides
        self.markers = Markers.of(session.tokenizer)
        self.images: list[str] = []  # attached to the next message

    def command(self, line: str) -> bool:
        """Run a /command; False means exit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.session.reset()
            self.images = []
            self.console.print("[dim]conversation reset[/dim]")
        elif name == "/system":
            self.session.set_system(arg)
            self.console.print("[dim]system prompt set; conversation reset[/dim]" if arg else "[dim]system prompt cleared[/dim]")
        elif name == "/think":
            self.enable_thinking = not self.enable_thinking
            self.console.print(f"thinking {'on' if self.enable_thinking else 'off'} for the next turns", style="dim")
        elif name == "/tool-result":
            return self.tool_result(arg)
        elif name == "/image":
            self.attach(arg)
        elif name == "/stats":
            last = self.session.last
            self.console.print(format_stats(last) if last else "no reply yet", markup=False)
        elif name == "/save":
            if not arg:
                self.error("/save needs a file name: /save <file>")
            else:
                try:
                    Path(arg).expanduser().write_text(json.dumps(self.session.messages, indent=2, ensure_ascii=False))
                    saved = plural(len(self.session.messages), "message")
                    self.console.print(f"saved {saved} to {arg}", style="dim", markup=False)
                except OSError as e:
                    self.error(f"cannot save: {e}")
        elif name == "/help":
            self.console.print(HELP, markup=False)
        else:
            self.error(f"unknown command {printable(name)}; /help lists the commands")
        return True

    def error(self, message: str) -> None:
        self.console.print(f"error: {message}", style="red", markup=False, soft_wrap=True)

    def attach(self, path: str) -> None:
        """Attach the image at ``path`` to the next message, once it is known to be one the model can take."""
        if not path:
            return self.error("/image needs a file: /image <path>")
        if self.sharded:
            return self.error("images are not supported on a model sharded across machines")
        if self.session.model.vision is None:
            return self.error("this model takes no images: its checkpoint has no vision tower")
        try:
            read_image(path)
        except ImageError as e:
            return self.error(str(e))
        self.images.append(path)
        self.console.print(f"{plural(len(self.images), 'image')} attached to your next message", style="dim")

    def tool_result(self, content: str) -> bool:
        """Send ``content`` (JSON) as the result of the last reply's tool call; False means exit."""
        last = self.session.messages[-1] if self.session.messages else {}
        calls = last.get("tool_calls") if last.get("role") == "assistant" else None
        if not calls:
            self.error("the last reply made no tool call")
            return True
        try:
            json.loads(content)
        except json.JSONDecodeError as e:
            self.error(f"/tool-result needs JSON: /tool-result <json> ({e})")
            return True
        name = calls[0]["function"]["name"] if len(calls) == 1 else None
        return self.stream(self.session.send_tool_result(content, name=name, **self.turn_options()))

    def turn_options(self) -> dict[str, Any]:
        return {"draft": self.draft, "enable_thinking": self.enable_thinking}

    def reply(self, text: str) -> bool:
        """Stream a reply; False means exit."""
        images, self.images = self.images, []
        return self.stream(self.session.send(text, images=images, **self.turn_options()))

    def stream(self, stream: Iterator[GenerationResponse]) -> bool:
        """Show a reply as it streams; False means exit. Ctrl-C stops it at the next update
        (draft or canvas); a second one at once, unless sharded."""
        reply, raw, requests = Reply(), "", []

        def on_interrupt(signum, frame) -> None:
            if requests and not self.sharded:
                raise KeyboardInterrupt
            requests.append(signum)

        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_interrupt) if main else None
        try:
            with Live(render(reply), console=self.console, refresh_per_second=15, transient=True) as live:
                for r in stream:
                    reply.answer += r.text
                    reply.reasoning += r.reasoning
                    reply.tool_calls += r.tool_calls
                    raw += r.raw
                    draft = None if r.draft is None else parse_reply(raw + r.draft, self.markers, finished=False)
                    live.update(render(reply, draft))
                    if requests:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            stream.close()
            self.console.print(render(reply))
            self.console.print(Text("[interrupted; Ctrl-C ends a sharded chat]" if self.sharded else "[interrupted]",
                                    style="dim"))
            return not self.sharded
        except ContextFull as e:
            self.error(f"the context is full: {e}; /reset starts a new conversation")
            return True
        except ValueError as e:
            self.error(str(e))
            return True
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        self.console.print(render(reply))
        return True

    def run(self) -> None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        self.console.print("[dim]Type a message, /help for commands, Ctrl-D to quit.[/dim]")
        while True:
            try:
                line = input(">>> ").strip()
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print()
                if self.sharded:
                    return
                continue
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            if not self.reply(line):
                return


def run_chat(model, tokenizer, *, system: str | None, draft: bool, console: Console | None = None,
             generator: Generator = stream_generate, sharded: bool = False, enable_thinking: bool | None = None,
             **options: Any) -> None:
    """The REPL over a new ``ChatSession``; ``options`` (``tools``, generation settings) go to the session."""
    console = console or Console(highlight=False)
    session = ChatSession(model, tokenizer, system=system, generator=generator, **options)
    Repl(session, console, draft=draft, sharded=sharded, enable_thinking=enable_thinking).run()
