"""`pagedserve chat [MODEL]`: a chat in the terminal, as `ollama run` has it.

Answers stream in as they are generated and the conversation is kept until `/clear`. Ctrl-C stops
the answer being written (its request is aborted) and, at the prompt, only says how to leave;
`/bye` or Ctrl-D leaves. With `--url` the answers come from a running server; without, the model
loads in this process. `--verbose` prints Ollama's timing block after each answer.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from pagedserve.cli.chat_backends import AnswerPiece, AnswerTimings, ChatError

logger = logging.getLogger(__name__)

HELP = '''Available Commands:
  /set            Set session variables
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use """ to begin a multi-line message.
'''
SET_HELP = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
"""
PARAMETER_HELP = """Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter stop <string> <string> ...   Set the stop parameters
"""
# Ollama's parameter names (and the request's own) -> (request field, type).
PARAMETERS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "top_p": ("top_p", float), "top_k": ("top_k", int),
    "min_p": ("min_p", float), "seed": ("seed", int), "num_predict": ("max_tokens", int),
    "max_tokens": ("max_tokens", int), "repeat_penalty": ("repetition_penalty", float),
    "repetition_penalty": ("repetition_penalty", float), "stop": ("stop", list),
}
MULTILINE_QUOTES = '"""'


@dataclass
class ChatSession:
    """The conversation and what `/set` changed."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    is_verbose: bool = False

    def request_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages


def handle_command(session: ChatSession, line: str) -> str | None:
    """Apply one `/command` line; returns what to print, or None to leave the chat."""
    words = line.split()
    command = words[0]
    if command in ("/bye", "/exit"):
        return None
    if command in ("/?", "/help"):
        return SET_HELP if words[1:2] == ["set"] else HELP
    if command == "/clear":
        session.messages.clear()
        return "Cleared session context"
    if command == "/set":
        return _set(session, line.split(None, 2)[1:])
    return f"Unknown command '{command}'. Type /? for help"


def _set(session: ChatSession, words: list[str]) -> str:
    if not words:
        return SET_HELP
    what = words[0]
    if what == "system":
        session.system = words[1].strip() if len(words) > 1 and words[1].strip() else None
        return "Set system message." if session.system else "Cleared system message."
    if what in ("verbose", "quiet"):
        session.is_verbose = what == "verbose"
        return "Set 'verbose' mode." if session.is_verbose else "Set 'quiet' mode."
    rest = words[1] if len(words) > 1 else ""
    if what == "parameter":   # Ollama's spelling: /set parameter temperature 0.2
        what, _, rest = rest.strip().partition(" ")
    if what not in PARAMETERS:
        return PARAMETER_HELP if not what else f"Unknown parameter '{what}'. Type /? set for help"
    name, kind = PARAMETERS[what]
    values = rest.split()
    if not values:
        return f"Usage: /set parameter {what} <value>"
    try:
        session.options[name] = values if kind is list else kind(values[0])
    except ValueError:
        return f"Couldn't set parameter: {what} must be {'an integer' if kind is int else 'a number'}"
    return f"Set parameter '{what}' to '{', '.join(values)}'"


def read_message(read_line: Callable[[str], str]) -> str:
    """One message: a line, or several between \"\"\" marks (the ... prompt continues it)."""
    line = read_line(">>> ")
    if not line.lstrip().startswith(MULTILINE_QUOTES):
        return line
    text = line.lstrip()[len(MULTILINE_QUOTES):]
    lines = []
    while not text.rstrip().endswith(MULTILINE_QUOTES):
        lines.append(text)
        text = read_line("... ")
    lines.append(text.rstrip()[:-len(MULTILINE_QUOTES)])
    return "\n".join(lines).strip()


def go_duration(seconds: float) -> str:
    """A duration as Go prints a time.Duration, as Ollama's --verbose lines do: 97.885315ms, 2m3.5s."""
    nanoseconds = round(seconds * 1e9)
    sign, nanoseconds = ("-" if nanoseconds < 0 else ""), abs(nanoseconds)
    if nanoseconds < 1_000:
        return f"{sign}{nanoseconds}ns" if nanoseconds else "0s"
    if nanoseconds < 1_000_000:
        return f"{sign}{_decimal(nanoseconds, 1_000)}µs"
    if nanoseconds < 1_000_000_000:
        return f"{sign}{_decimal(nanoseconds, 1_000_000)}ms"
    hours, rest = divmod(nanoseconds, 3_600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    prefix = f"{hours}h{minutes}m" if hours else (f"{minutes}m" if minutes else "")
    return f"{sign}{prefix}{_decimal(rest, 10**9)}s"


def _decimal(value: int, unit: int) -> str:
    whole, fraction = divmod(value, unit)
    digits = str(fraction).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def timing_lines(timings: AnswerTimings) -> list[str]:
    """Ollama's --verbose block; like Ollama, a line is left out when its value is zero."""
    lines = []
    if timings.total_seconds > 0:
        lines.append(f"total duration:       {go_duration(timings.total_seconds)}")
    if timings.load_seconds > 0:
        lines.append(f"load duration:        {go_duration(timings.load_seconds)}")
    if timings.num_prompt_tokens > 0:
        lines.append(f"prompt eval count:    {timings.num_prompt_tokens} token(s)")
    if timings.prompt_eval_seconds > 0:
        lines.append(f"prompt eval duration: {go_duration(timings.prompt_eval_seconds)}")
        lines.append(f"prompt eval rate:     {timings.num_prompt_tokens / timings.prompt_eval_seconds:.2f} tokens/s")
    if timings.num_output_tokens > 0:
        lines.append(f"eval count:           {timings.num_output_tokens} token(s)")
    if timings.eval_seconds > 0:
        lines.append(f"eval duration:        {go_duration(timings.eval_seconds)}")
        lines.append(f"eval rate:            {timings.num_output_tokens / timings.eval_seconds:.2f} tokens/s")
    return lines


class AnswerPrinter:
    """Writes an answer as it streams in; reasoning goes between Ollama's Thinking... marks."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._is_thinking = False
        self.text = ""

    def write(self, piece: AnswerPiece) -> None:
        if piece.reasoning:
            if not self._is_thinking:
                self._out.write("Thinking...\n")
                self._is_thinking = True
            self._out.write(piece.reasoning)
        if piece.text:
            if self._is_thinking:
                self._out.write("\n...done thinking.\n\n")
                self._is_thinking = False
            self._out.write(piece.text)
            self.text += piece.text
        self._out.flush()


class TerminalChat:
    """The read-answer loop. Answers run on `loop`, which the backend was connected on; the chat
    closes both when it ends."""

    def __init__(self, backend: Any, session: ChatSession, loop: asyncio.AbstractEventLoop,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self._backend = backend
        self._session = session
        self._loop = loop
        self._out, self._err = out, err

    def run(self, read_line: Callable[[str], str] = input) -> int:
        try:
            while True:
                try:
                    line = read_message(read_line)
                except EOFError:
                    self._out.write("\n")
                    return 0
                except KeyboardInterrupt:
                    self._out.write("\nUse Ctrl + d or /bye to exit.\n")
                    continue
                if not line.strip():
                    continue
                if line.startswith("/"):
                    reply = handle_command(self._session, line)
                    if reply is None:
                        return 0
                    self._out.write(reply.rstrip("\n") + "\n")
                    continue
                self._answer(line)
        finally:
            self._loop.run_until_complete(self._backend.close())
            self._loop.close()

    def _answer(self, question: str) -> None:
        """Stream one answer; the exchange joins the history only if the answer completed."""
        messages = [*self._session.request_messages(), {"role": "user", "content": question}]
        printer = AnswerPrinter(self._out)
        task = self._loop.create_task(self._stream(messages, printer))
        self._loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            timings = self._loop.run_until_complete(task)
        except asyncio.CancelledError:   # Ctrl-C
            self._out.write("\n\n")
            return
        except (ChatError, ValueError) as error:
            self._out.write("\n")
            self._err.write(f"Error: {error}\n")
            return
        finally:
            self._loop.remove_signal_handler(signal.SIGINT)
        self._session.messages += [{"role": "user", "content": question},
                                   {"role": "assistant", "content": printer.text}]
        self._out.write("\n\n")
        self._out.flush()
        if self._session.is_verbose and timings is not None:
            self._err.write("".join(line + "\n" for line in timing_lines(timings)))
            self._err.flush()

    async def _stream(self, messages: list[dict[str, str]], printer: AnswerPrinter) -> AnswerTimings | None:
        timings = None
        async for piece in self._backend.stream(messages, self._session.options):
            printer.write(piece)
            timings = piece.timings or timings
        return timings


def add_chat_parser(commands: argparse._SubParsersAction, add_engine_flags: Callable) -> None:
    chat = commands.add_parser("chat", help="chat with a model in the terminal, like `ollama run`")
    chat.add_argument("model_positional", nargs="?", metavar="MODEL",
                      help="model to load here (same as --model); with --url, the served name (default: the first)")
    chat.add_argument("--url", default=None,
                      help="chat with the server at this address (e.g. http://127.0.0.1:8000) instead of loading "
                           "the model in this process")
    chat.add_argument("--api-key", "--api_key", dest="chat_api_key", metavar="KEY",
                      default=os.environ.get("PAGEDSERVE_API_KEY"),
                      help="the server's API key, with --url (default: $PAGEDSERVE_API_KEY)")
    chat.add_argument("--verbose", action="store_true", help="print timings and token rates after each answer")
    add_engine_flags(chat)
    chat.set_defaults(func=run_chat_command, log_level="WARNING")


def run_chat_command(args: argparse.Namespace) -> int:
    loop = asyncio.new_event_loop()
    try:
        backend = _connect(args, loop)
    except (ChatError, KeyboardInterrupt) as error:
        loop.close()
        sys.stderr.write(f"Error: {error}\n" if isinstance(error, ChatError) else "\n")
        return 1 if isinstance(error, ChatError) else 130
    return TerminalChat(backend, ChatSession(is_verbose=args.verbose), loop).run(_line_reader())


def _connect(args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> Any:
    """The model loaded here, or the server at --url once it answered."""
    from pagedserve.cli.chat_backends import EngineChat, ServerChat
    from pagedserve.cli.options import engine_config_from_options, gather_options
    from pagedserve.cli.flags import pick
    from pagedserve.config import EngineConfig

    options = gather_options(args)
    if args.url is None:
        return EngineChat(engine_config_from_options(options))
    for name in sorted(set(pick(options, EngineConfig)) - {"model"}):
        logger.warning("--%s has no effect with --url: the server's model answers", name.replace("_", "-"))
    backend = ServerChat(args.url, args.chat_api_key)
    try:
        loop.run_until_complete(backend.connect(options.get("model")))
    except BaseException:
        loop.run_until_complete(backend.close())
        raise
    return backend


def _line_reader() -> Callable[[str], str]:
    """input(), with line editing and history when the terminal has readline."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it is what gives input() line editing
        except ImportError:
            pass
    return input
