"""`pagedserve chat`: its commands and Ollama's timing lines, then the real thing in a pseudo-terminal,
with the model in-process and against a live server (--url)."""
from __future__ import annotations

import io
import re
import sys
import time
from pathlib import Path

import pexpect
import pytest

from pagedserve.cli.chat_backends import AnswerPiece, AnswerTimings
from pagedserve.cli.chat import (AnswerPrinter, ChatSession, go_duration, handle_command, read_message,
                                      timing_lines)
from tests.chat_server import API_KEY

REPO = Path(__file__).parent.parent
GO_DURATION = r"(\d+h)?(\d+m)?\d+(\.\d+)?(ns|µs|ms|s)"
# Ollama's --verbose block, line by line (api.Metrics.Summary / cmd.go).
VERBOSE_BLOCK = "\r?\n".join([
    rf"total duration:       {GO_DURATION}",
    rf"load duration:        {GO_DURATION}",
    r"prompt eval count:    \d+ token\(s\)",
    rf"prompt eval duration: {GO_DURATION}",
    r"prompt eval rate:     \d+\.\d\d tokens/s",
    r"eval count:           (?P<eval_count>\d+) token\(s\)",
    rf"eval duration:        {GO_DURATION}",
    r"eval rate:            \d+\.\d\d tokens/s",
])
RUNNING = "vllm:num_requests_running"
ABORTED = 'vllm:request_success_total{finished_reason="abort",model_name="smollm2"}'


# ---- the parts without a terminal -------------------------------------------------------------

@pytest.mark.parametrize("seconds, expected", [
    (0, "0s"), (5e-7, "500ns"), (1.5e-6, "1.5µs"), (0.097885315, "97.885315ms"), (0.25, "250ms"), (1, "1s"),
    (18.293521648, "18.293521648s"), (163.589481292, "2m43.589481292s"), (3600, "1h0m0s"), (3725.5, "1h2m5.5s"),
])
def test_durations_print_as_go_prints_them(seconds, expected):
    assert go_duration(seconds) == expected


def test_timing_lines_are_ollamas():
    timings = AnswerTimings(total_seconds=18.293521648, load_seconds=0.097885315, num_prompt_tokens=21,
                            prompt_eval_seconds=1.346030951, num_output_tokens=160, eval_seconds=16.774703785)
    assert timing_lines(timings) == [
        "total duration:       18.293521648s",
        "load duration:        97.885315ms",
        "prompt eval count:    21 token(s)",
        "prompt eval duration: 1.346030951s",
        "prompt eval rate:     15.60 tokens/s",
        "eval count:           160 token(s)",
        "eval duration:        16.774703785s",
        "eval rate:            9.54 tokens/s",
    ]
    # As in Ollama, a zero value leaves its lines out (one token: no time between first and last).
    one_token = AnswerTimings(0.5, 0.001, 0, 0.4, 1, 0.0)
    assert [line.split(":")[0] for line in timing_lines(one_token)] == [
        "total duration", "load duration", "prompt eval duration", "prompt eval rate", "eval count"]


def test_commands():
    session = ChatSession(messages=[{"role": "user", "content": "hi"}])
    assert handle_command(session, "/set temperature 0.2") == "Set parameter 'temperature' to '0.2'"
    assert handle_command(session, "/set parameter num_predict 7") == "Set parameter 'num_predict' to '7'"
    assert handle_command(session, "/set parameter repeat_penalty 1.1") == "Set parameter 'repeat_penalty' to '1.1'"
    assert handle_command(session, "/set stop END ###") == "Set parameter 'stop' to 'END, ###'"
    assert session.options == {"temperature": 0.2, "max_tokens": 7, "repetition_penalty": 1.1, "stop": ["END", "###"]}
    assert "integer" in handle_command(session, "/set max_tokens lots") and session.options["max_tokens"] == 7
    assert handle_command(session, "/set bogus 1").startswith("Unknown parameter 'bogus'")
    assert handle_command(session, "/set system You are a pirate.  ") == "Set system message."
    assert session.request_messages()[0] == {"role": "system", "content": "You are a pirate."}
    assert handle_command(session, "/set verbose") == "Set 'verbose' mode." and session.is_verbose
    assert handle_command(session, "/clear") == "Cleared session context"
    assert session.request_messages() == [{"role": "system", "content": "You are a pirate."}]
    assert "/bye" in handle_command(session, "/?") and "/set system" in handle_command(session, "/? set")
    assert handle_command(session, "/load x").startswith("Unknown command '/load'")
    assert handle_command(session, "/bye") is None


def test_multiline_messages():
    lines = iter(['"""first line', "second line", 'third"""'])
    prompts = []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        return next(lines)

    assert read_message(read_line) == "first line\nsecond line\nthird"
    assert prompts == [">>> ", "... ", "... "]
    assert read_message(lambda _: '"""one line"""') == "one line"


def test_reasoning_is_printed_between_ollamas_thinking_marks():
    out = io.StringIO()
    printer = AnswerPrinter(out)
    for piece in (AnswerPiece(reasoning="Hmm, "), AnswerPiece(reasoning="two."), AnswerPiece(text="It is "),
                  AnswerPiece(text="2."), AnswerPiece(timings=AnswerTimings(1, 0, 1, 0, 1, 0))):
        printer.write(piece)
    assert out.getvalue() == "Thinking...\nHmm, two.\n...done thinking.\n\nIt is 2."
    assert printer.text == "It is 2."     # what joins the history: the answer without the thinking


# ---- in a pseudo-terminal -----------------------------------------------------------------------

def spawn_chat(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "pagedserve", "chat", *args], cwd=str(REPO), encoding="utf-8",
                         timeout=60, dimensions=(40, 200))


def say(child: pexpect.spawn, line: str, timeout: float = 120) -> list[str]:
    """Send a line; the chunks the terminal showed until the next prompt (echo included)."""
    child.sendline(line)
    chunks: list[str] = []
    deadline = time.monotonic() + timeout
    while not "".join(chunks).endswith(">>> "):
        if time.monotonic() > deadline:
            raise AssertionError(f"no prompt after {line!r} within {timeout} s; got {''.join(chunks)!r}")
        try:
            chunks.append(child.read_nonblocking(4096, timeout=1))
        except pexpect.TIMEOUT:
            continue
    return chunks


def interrupt_a_long_answer(child: pexpect.spawn) -> None:
    """Ask for a long answer and press Ctrl-C once it is under way; the prompt must come back."""
    child.sendline("Count from 1 to 1000, separated by commas.")
    child.expect(r"(\d+\D{0,2}){12}", timeout=120)
    child.sendintr()
    child.expect(">>> ", timeout=15)
    assert "Traceback" not in child.before and child.isalive()


def test_in_process_chat():
    child = spawn_chat("smollm2-135m-instruct", "--verbose")
    try:
        child.expect(">>> ", timeout=240)
        assert "Set parameter 'temperature' to '0'" in "".join(say(child, "/set temperature 0"))

        chunks = say(child, "What is the capital of France?")
        shown = "".join(chunks)
        answer = shown[:shown.index("total duration:")]
        assert "Paris" in answer
        assert sum(1 for chunk in chunks if chunk.strip() and chunk in answer) >= 2, chunks   # streamed, not at once
        assert re.search(VERBOSE_BLOCK + r"\r?\n>>> $", shown), shown

        assert "Cleared session context" in "".join(say(child, "/clear"))
        interrupt_a_long_answer(child)

        say(child, "/set parameter num_predict 5")
        shown = "".join(say(child, "What is the capital of France?"))
        assert re.search(VERBOSE_BLOCK, shown)["eval_count"] == "5"

        child.sendline("/bye")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def received_prompts(server) -> list[str]:
    return re.findall(r"Received request chatcmpl-\S+: prompt: (.*), params:", server.log())


def test_chat_with_a_server(chat_server):
    refused = spawn_chat("--url", chat_server.base_url, "--api-key", "wrong")
    refused.expect(pexpect.EOF)
    refused.close()
    assert refused.exitstatus == 1 and "Error: the server wants an API key" in refused.before

    child = spawn_chat("--url", chat_server.base_url + "/v1", "--api-key", API_KEY, "--verbose")
    try:
        child.expect(">>> ")
        say(child, "/set temperature 0")
        say(child, "/set max_tokens 12")
        shown = "".join(say(child, "What is the capital of France?"))
        assert "Paris" in shown and re.search(VERBOSE_BLOCK, shown), shown
        say(child, "Tell me more.")
        assert "capital of France" in received_prompts(chat_server)[-1]     # the history went along
        say(child, "/clear")
        say(child, "Hello there.")
        assert "Hello there" in received_prompts(chat_server)[-1]
        assert "capital of France" not in received_prompts(chat_server)[-1]

        say(child, "/clear")
        say(child, "/set max_tokens 2000")
        num_aborted = chat_server.metric(ABORTED)
        interrupt_a_long_answer(child)
        chat_server.wait_for_metrics({RUNNING: 0, ABORTED: num_aborted + 1})

        child.sendeof()    # Ctrl-D
        child.expect(pexpect.EOF, timeout=15)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
