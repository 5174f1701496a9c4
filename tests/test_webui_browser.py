"""The web chat in a real browser: Debian's headless Chromium, driven by Selenium, against a live
SmolLM2 server that wants an API key.

The tests share one browser; each opens the page afresh and gives it the key if it asks (the page keeps
it in localStorage), so they run in any order.
Chromium comes from apt (`make test` installs it); without it these tests fail rather than skip.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.chat_server import API_KEY, MODEL_NAMES
from tests.server_process import wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# No sandbox (tests may run as root in a container), and nothing that talks to Google's servers.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900")
ABORTED = 'vllm:request_success_total{finished_reason="abort",model_name="smollm2"}'
RUNNING = "vllm:num_requests_running"

# Records the last answer's text on every change of the page, and its classes then ("streaming", "stopped").
RECORD_PARTIALS = """
window.partials = [];
new MutationObserver(() => {
  const answer = [...document.querySelectorAll(".message.assistant")].at(-1);
  if (answer) window.partials.push([answer.querySelector(".content").textContent, [...answer.classList]]);
}).observe(document.getElementById("messages"), {childList: true, subtree: true, characterData: true,
                                                 attributes: true});
"""

# Replaces fetch() for chat completions with a canned stream, cut at awkward places (inside
# "data:", between \\r and \\n), and keeps the request bodies the page sent.
FAKE_CHAT_STREAM = """
const streams = arguments[0];
const realFetch = window.fetch;
window.sentBodies = [];
window.fetch = async (url, init) => {
  if (!String(url).includes("chat/completions")) return realFetch(url, init);
  window.sentBodies.push(JSON.parse(init.body));
  const pieces = streams[window.sentBodies.length - 1];
  const body = new ReadableStream({async start(controller) {
    for (const piece of pieces) {
      controller.enqueue(new TextEncoder().encode(piece));
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    controller.close();
  }});
  return new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
};
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("Chromium is missing: apt-get install -y chromium chromium-driver (make test installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def by_id(browser, element_id: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def model_names(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)")


def is_asking_for_the_key(browser) -> bool:
    return browser.execute_script("return document.getElementById('key-dialog').open")


def open_chat(browser, server) -> None:
    """A fresh page with its model list loaded, given the key if it asks (it remembers it once given)."""
    browser.get(server.url("/"))
    wait_until(lambda: model_names(browser) or is_asking_for_the_key(browser), what="the model list or the key")
    if is_asking_for_the_key(browser):
        by_id(browser, "api-key").send_keys(API_KEY)
        by_id(browser, "key-save").click()
    wait_until(lambda: model_names(browser), what="the model list")


def set_value(browser, element_id: str, value: str) -> None:
    browser.execute_script("document.getElementById(arguments[0]).value = arguments[1]", element_id, value)


def ask(browser, question: str) -> None:
    by_id(browser, "prompt").send_keys(question)
    by_id(browser, "send").click()


def last_answer(browser) -> dict:
    return browser.execute_script("""
        const answer = [...document.querySelectorAll('.message.assistant')].at(-1);
        if (!answer) return null;
        const thinking = answer.querySelector('.thinking');
        return {classes: [...answer.classList], text: answer.querySelector('.content').textContent,
                html: answer.querySelector('.content').innerHTML, stats: answer.querySelector('.stats').textContent,
                thinking_hidden: thinking.hidden, thinking_summary: thinking.querySelector('summary').textContent,
                thinking: thinking.querySelector('.thinking-body').textContent};""")


def test_the_page_asks_for_the_api_key_then_lists_the_models(browser, chat_server):
    browser.get(chat_server.url("/"))
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    dialog = by_id(browser, "key-dialog")
    wait_until(lambda: is_asking_for_the_key(browser) and dialog.is_displayed(), what="the key dialog")
    by_id(browser, "api-key").send_keys("not-the-key")
    by_id(browser, "key-save").click()
    wait_until(lambda: "refused" in by_id(browser, "key-error").text, what="the key to be refused")
    assert dialog.get_attribute("open") is not None and model_names(browser) == []
    by_id(browser, "api-key").send_keys(API_KEY)
    by_id(browser, "key-save").click()
    assert wait_until(lambda: model_names(browser), what="the model list") == list(MODEL_NAMES)
    assert dialog.get_attribute("open") is None
    assert browser.execute_script("return localStorage.getItem('pagedserve.apiKey')") == API_KEY


def test_an_answer_streams_in_and_ends_with_its_stats(browser, chat_server):
    open_chat(browser, chat_server)
    set_value(browser, "temperature", "0")
    set_value(browser, "max-tokens", "40")
    browser.execute_script(RECORD_PARTIALS)
    ask(browser, "What is the capital of France?")
    answer = wait_until(lambda: (a := last_answer(browser)) and "streaming" not in a["classes"] and a, timeout=120,
                        interval=0.2, what="the answer to finish")
    assert "done" in answer["classes"], answer
    assert "Paris" in answer["text"]
    partials = {text for text, classes in browser.execute_script("return window.partials")
                if "streaming" in classes and text}
    assert len(partials) >= 2, partials    # it grew in front of us, not all at once
    assert re.fullmatch(r"\d+ tokens · \d+\.\d tok/s · TTFT \d+ ms", answer["stats"]), answer["stats"]


def test_stop_ends_the_answer_and_the_request_on_the_server(browser, chat_server):
    open_chat(browser, chat_server)
    set_value(browser, "temperature", "0")
    set_value(browser, "max-tokens", "2000")
    num_aborted = chat_server.metric(ABORTED)
    browser.execute_script(RECORD_PARTIALS)
    ask(browser, "Count from 1 to 1000, separated by commas.")
    wait_until(lambda: len(last_answer(browser)["text"]) >= 20, timeout=120, what="the answer to start")
    assert chat_server.metric(RUNNING) == 1
    by_id(browser, "stop").click()
    answer = wait_until(lambda: (a := last_answer(browser)) and "stopped" in a["classes"] and a, timeout=5,
                        what="the page to show the answer stopped")
    assert answer["stats"] == "Stopped."
    assert not by_id(browser, "stop").is_enabled() and by_id(browser, "send").is_enabled()
    chat_server.wait_for_metrics({RUNNING: 0, ABORTED: num_aborted + 1})
    # The server has aborted the request, so no more text can come: from the change that showed the answer
    # stopped to now, the page recorded that text and nothing more.
    history = browser.execute_script("return window.partials")
    stopped_at = next(index for index, (_, classes) in enumerate(history) if "stopped" in classes)
    assert {text for text, _ in history[stopped_at:]} == {answer["text"]}
    assert last_answer(browser)["text"] == answer["text"]
    by_id(browser, "new-chat").click()
    assert browser.execute_script("return document.querySelectorAll('#messages .message').length") == 0


def sse(*events: str) -> str:
    return "".join(f"data: {event}\n\n" for event in events)


def test_thinking_is_shown_apart_from_the_answer_and_not_sent_back(browser, chat_server):
    open_chat(browser, chat_server)
    by_id(browser, "system").send_keys("Answer briefly.")
    set_value(browser, "temperature", "0.3")
    set_value(browser, "max-tokens", "77")
    reasoning_stream = sse('{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
                           '{"choices":[{"index":0,"delta":{"reasoning_content":"Let me think","reasoning":"x"}}]}',
                           '{"choices":[{"index":0,"delta":{"reasoning_content":" about it."}}]}',
                           '{"choices":[{"index":0,"delta":{"content":"The answer is **42**."}}]}',
                           '{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}',
                           "[DONE]").replace("\n\n", "\r\n\r\n", 1)
    think_tag_stream = sse('{"choices":[{"index":0,"delta":{"content":"<think>inner "}}]}',
                           '{"choices":[{"index":0,"delta":{"content":"reasoning</think>Plain answer."}}]}', "[DONE]")
    cut = [[stream[:start], stream[start:start + 7], stream[start + 7:]]
           for stream, start in ((reasoning_stream, 3), (think_tag_stream, 40))]
    browser.execute_script(FAKE_CHAT_STREAM, cut)

    ask(browser, "What is six times seven?")
    answer = wait_until(lambda: (a := last_answer(browser)) and "done" in a["classes"] and a, what="answer one")
    assert not answer["thinking_hidden"] and answer["thinking"] == "Let me think about it."
    assert answer["thinking_summary"] == "Thoughts"
    assert answer["html"] == "<p>The answer is <strong>42</strong>.</p>"
    assert answer["stats"].startswith("9 tokens")

    ask(browser, "And the second?")
    answer = wait_until(lambda: (a := last_answer(browser)) and "done" in a["classes"] and a, what="answer two")
    assert answer["thinking"] == "inner reasoning" and answer["text"] == "Plain answer."
    sent = browser.execute_script("return window.sentBodies")
    assert sent[1]["messages"] == [{"role": "system", "content": "Answer briefly."},
                                   {"role": "user", "content": "What is six times seven?"},
                                   {"role": "assistant", "content": "The answer is **42**."},
                                   {"role": "user", "content": "And the second?"}]
    assert sent[1]["stream"] is True and sent[1]["stream_options"] == {"include_usage": True}
    assert sent[1]["model"] == MODEL_NAMES[0] and sent[1]["temperature"] == 0.3 and sent[1]["max_tokens"] == 77


MARKDOWN = """# Title

Some **bold**, *italic*, snake_case_name and `a<b>` code; [a link](javascript:alert(1)).

```python
print('<script>alert(1)</script>')
```

- one
- **two**

3. three
4. four

<img src=x onerror="window.hacked = 1"> & <b>not bold</b>

```js
let streaming = 'not closed yet'"""


def test_markdown_is_rendered_without_ever_parsing_model_text_as_html(browser, chat_server):
    open_chat(browser, chat_server)
    rendered = browser.execute_script("""
        const target = document.createElement('div');
        PagedMarkdown.render(arguments[0], target);
        const texts = (selector) => [...target.querySelectorAll(selector)].map((node) => node.textContent);
        return {unsafe: target.querySelectorAll('img, script, a, b, iframe, [onerror]').length,
                h1: texts('h1'), strong: texts('strong'), em: texts('em'), code: texts(':not(pre) > code'),
                pre: texts('pre > code'), languages: texts('pre').map((_, i) => target.querySelectorAll('pre')[i].dataset.language),
                ul: texts('ul > li'), ol: texts('ol > li'), olStart: target.querySelector('ol').start,
                paragraphs: texts('p'), link: texts('.link .url')};""", MARKDOWN)
    assert rendered["unsafe"] == 0
    assert rendered["h1"] == ["Title"] and rendered["strong"] == ["bold", "two"] and rendered["em"] == ["italic"]
    assert rendered["code"] == ["a<b>"]
    assert rendered["pre"] == ["print('<script>alert(1)</script>')", "let streaming = 'not closed yet'"]
    assert rendered["languages"] == ["python", "js"]
    assert rendered["ul"] == ["one", "two"] and rendered["ol"] == ["three", "four"] and rendered["olStart"] == 3
    assert rendered["link"] == ["javascript:alert(1)"]
    assert '<img src=x onerror="window.hacked = 1"> & <b>not bold</b>' in rendered["paragraphs"]
    assert "snake_case_name" in rendered["paragraphs"][0]
    assert browser.execute_script("return window.hacked") is None
