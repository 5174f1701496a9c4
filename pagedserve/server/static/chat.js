// The web chat: streams /v1/chat/completions into the page, with the server's API key when it has one.
"use strict";

const PagedChat = (() => {
  const KEY_STORAGE = "pagedserve.apiKey";
  const MODEL_STORAGE = "pagedserve.model";
  const RENDER_INTERVAL_MS = 40;   // at most ~25 re-renders a second while tokens stream in
  const THINK_START = "<think>";
  const THINK_END = "</think>";
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), newChat: $("new-chat"), system: $("system"), temperature: $("temperature"),
    maxTokens: $("max-tokens"), status: $("status"), messages: $("messages"), composer: $("composer"),
    prompt: $("prompt"), send: $("send"), stop: $("stop"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
    keyInput: $("api-key"), keyError: $("key-error"),
  };
  const state = {
    history: [], chatId: 0, controller: null, apiKey: localStorage.getItem(KEY_STORAGE) || "", keyWaiters: [],
  };

  // ---- the API key ---------------------------------------------------------------------------

  function askForKey(reason) {
    ui.keyError.textContent = reason;
    ui.keyInput.value = "";
    if (!ui.keyDialog.open) ui.keyDialog.showModal();
    ui.keyInput.focus();
    return new Promise((resolve) => state.keyWaiters.push(resolve));
  }

  ui.keyForm.addEventListener("submit", () => {
    state.apiKey = ui.keyInput.value.trim();
    localStorage.setItem(KEY_STORAGE, state.apiKey);
    for (const resolve of state.keyWaiters.splice(0)) resolve();
  });
  // Without a key nothing works, so Escape does not dismiss the question.
  ui.keyDialog.addEventListener("cancel", (event) => event.preventDefault());

  /** fetch() with the API key; on 401 asks for a key and tries again. */
  async function api(path, init = {}) {
    for (;;) {
      const headers = new Headers(init.headers || {});
      if (state.apiKey) headers.set("Authorization", `Bearer ${state.apiKey}`);
      const response = await fetch(path, { ...init, headers });
      if (response.status !== 401) return response;
      const reason = state.apiKey ? "The server refused this key." : "";
      await askForKey(reason);
    }
  }

  async function errorMessage(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      return body.error?.message || body.error || text;
    } catch {
      return text || `${response.status} ${response.statusText}`;
    }
  }

  // ---- models --------------------------------------------------------------------------------

  async function loadModels() {
    setStatus("Loading the model list…");
    const response = await api("v1/models");
    if (!response.ok) {
      setStatus(`Could not list the models: ${await errorMessage(response)}`, true);
      return;
    }
    const names = (await response.json()).data.map((card) => card.id);
    ui.model.replaceChildren(...names.map((name) => new Option(name, name)));
    const saved = localStorage.getItem(MODEL_STORAGE);
    if (names.includes(saved)) ui.model.value = saved;
    setStatus(names.length ? "" : "The server lists no models.", !names.length);
  }

  ui.model.addEventListener("change", () => localStorage.setItem(MODEL_STORAGE, ui.model.value));

  // ---- server-sent events --------------------------------------------------------------------

  /** The data of each event of an SSE body: parsed JSON, or the string "[DONE]". */
  async function* sseEvents(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) !== -1) {
          const data = buffer.slice(0, end).split("\n")
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
          buffer = buffer.slice(end + 2);
          if (data) yield data === "[DONE]" ? data : JSON.parse(data);
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  // ---- one answer ----------------------------------------------------------------------------

  /** {thinking, answer, isThinking} from text that may hold <think>…</think> (or only </think>,
   *  when the chat template opened the tag in the prompt). */
  function splitThinking(text) {
    const start = text.indexOf(THINK_START);
    const end = text.indexOf(THINK_END, start === -1 ? 0 : start);
    if (start === -1 && end === -1) return { thinking: "", answer: text, isThinking: false };
    const from = start === -1 ? 0 : start + THINK_START.length;
    const before = start === -1 ? "" : text.slice(0, start);
    if (end === -1) return { thinking: text.slice(from), answer: before, isThinking: true };
    return { thinking: text.slice(from, end), answer: before + text.slice(end + THINK_END.length), isThinking: false };
  }

  class AnswerView {
    constructor() {
      this.summary = element("summary", "", "Thinking…");
      this.thinkingBody = element("div", "thinking-body");
      this.thinking = element("details", "thinking", this.summary, this.thinkingBody);
      this.thinking.hidden = true;
      this.thinking.open = true;
      this.content = element("div", "content");
      this.stats = element("footer", "stats");
      this.node = element("article", "message assistant streaming", this.thinking, this.content, this.stats);
      ui.messages.append(this.node);
      this.reasoning = "";
      this.text = "";
      this.renderTimer = null;
      this.lastRender = 0;
    }

    add(reasoning, text) {
      this.reasoning += reasoning;
      this.text += text;
      const wait = RENDER_INTERVAL_MS - (performance.now() - this.lastRender);
      if (wait <= 0) this.render();
      else if (this.renderTimer === null) this.renderTimer = setTimeout(() => this.render(), wait);
    }

    get parts() {
      const inline = splitThinking(this.text);
      const thinking = [this.reasoning, inline.thinking].filter(Boolean).join("\n\n");
      return { thinking, answer: inline.answer, isThinking: inline.isThinking || (!!this.reasoning && !inline.answer) };
    }

    render() {
      clearTimeout(this.renderTimer);
      this.renderTimer = null;
      this.lastRender = performance.now();
      const { thinking, answer, isThinking } = this.parts;
      if (thinking) {
        this.thinking.hidden = false;
        this.thinkingBody.textContent = thinking;
        this.summary.textContent = isThinking ? "Thinking…" : "Thoughts";
      }
      PagedMarkdown.render(answer, this.content);
      scrollToEnd();
    }

    finish(outcome, note) {
      this.render();
      if (this.parts.thinking) {
        this.summary.textContent = "Thoughts";
        this.thinking.open = false;
      }
      this.node.classList.remove("streaming");
      this.node.classList.add(outcome);
      this.stats.textContent = note;
    }
  }

  function statsNote(timing, usage) {
    const pieces = [];
    if (usage) pieces.push(`${usage.completion_tokens} tokens`);
    if (usage && timing.lastAt > timing.firstAt && usage.completion_tokens > 1) {
      pieces.push(`${(usage.completion_tokens / ((timing.lastAt - timing.firstAt) / 1000)).toFixed(1)} tok/s`);
    }
    if (timing.firstAt !== null) pieces.push(`TTFT ${Math.round(timing.firstAt - timing.sentAt)} ms`);
    return pieces.join(" · ");
  }

  function requestBody() {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history);
    const body = { model: ui.model.value || undefined, messages, stream: true, stream_options: { include_usage: true } };
    const temperature = parseFloat(ui.temperature.value);
    const maxTokens = parseInt(ui.maxTokens.value, 10);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  async function streamAnswer(view, signal) {
    const timing = { sentAt: performance.now(), firstAt: null, lastAt: null };
    let usage = null;
    const response = await api("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()), signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of sseEvents(response.body)) {
      if (event === "[DONE]") break;
      if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
      if (event.usage) usage = event.usage;
      const delta = event.choices?.[0]?.delta;
      if (!delta) continue;
      const reasoning = delta.reasoning_content ?? delta.reasoning ?? "";
      const content = delta.content ?? "";
      if (!reasoning && !content) continue;
      timing.lastAt = performance.now();
      timing.firstAt ??= timing.lastAt;
      view.add(reasoning, content);
    }
    return statsNote(timing, usage);
  }

  async function send() {
    const text = ui.prompt.value.trim();
    if (!text || state.controller) return;
    ui.prompt.value = "";
    const chatId = state.chatId;
    const question = { role: "user", content: text };
    state.history.push(question);
    ui.messages.append(element("article", "message user", text));
    const view = new AnswerView();
    const controller = new AbortController();
    setStreaming(controller);
    try {
      view.finish("done", await streamAnswer(view, controller.signal));
    } catch (error) {
      if (controller.signal.aborted) view.finish("stopped", "Stopped.");
      else view.finish("failed", `Error: ${error.message}`);
    } finally {
      setStreaming(null);
    }
    // NOTE: the thinking is not sent back; a stopped answer stays in the history as far as it got.
    const answer = view.parts.answer.trim();
    if (chatId !== state.chatId) return;   // "New chat" was pressed while this answer streamed
    if (answer) state.history.push({ role: "assistant", content: answer });
    else if (state.history.at(-1) === question) state.history.pop();
  }

  function stop() {
    state.controller?.abort();
  }

  function newChat() {
    stop();
    state.chatId++;
    state.history = [];
    ui.messages.replaceChildren();
    ui.prompt.focus();
  }

  // ---- page plumbing -------------------------------------------------------------------------

  function element(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    node.append(...children);
    return node;
  }

  function setStreaming(controller) {
    state.controller = controller;
    ui.send.disabled = !!controller;
    ui.stop.disabled = !controller;
  }

  function setStatus(text, isError = false) {
    ui.status.textContent = text;
    ui.status.classList.toggle("error", isError);
  }

  function scrollToEnd() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  loadModels().catch((error) => setStatus(`Could not list the models: ${error.message}`, true));

  return { splitThinking, sseEvents };
})();
