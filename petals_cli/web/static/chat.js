// petals chat: a conversation streamed from this server's own /v1/chat/completions (server-sent events), with an
// API key sent as the OpenAI SDKs send it. Model output is untrusted text: it only ever goes into textContent.
"use strict";
(function () {
  const body = document.body;
  const model = body.dataset.model;
  const keyRequired = body.dataset.keyRequired === "true";
  const $ = (id) => document.getElementById(id);
  const messagesBox = $("messages"), statusLine = $("status"), prompt = $("prompt");
  const send = $("send"), stop = $("stop"), fresh = $("new");
  const keyForm = $("key-form"), keyInput = $("api-key"), keyError = $("key-error");
  const KEY_ITEM = "petals-api-key";
  let conversation = [];
  let controller = null;

  function setState(state) {
    body.dataset.state = state;
    const streaming = state === "streaming";
    send.disabled = streaming || (keyRequired && !apiKey());
    stop.disabled = !streaming;
  }

  function apiKey() {
    return sessionStorage.getItem(KEY_ITEM) || "";
  }

  function askForKey(message) {
    keyForm.hidden = false;
    keyError.textContent = message || "";
    keyInput.focus();
    setState(body.dataset.state || "idle");
  }

  function bubble(role, text) {
    const hello = messagesBox.querySelector(".hello");
    if (hello) hello.remove();
    const box = document.createElement("div");
    box.className = `message ${role}`;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role === "user" ? "you" : role === "assistant" ? model.split("/").pop() : "error";
    const content = document.createElement("span");
    content.className = "content";
    content.textContent = text;
    box.append(label, content);
    messagesBox.append(box);
    messagesBox.scrollTop = messagesBox.scrollHeight;
    return content;
  }

  function numberField(id) {
    const value = $(id).value.trim();
    return value === "" ? null : Number(value);
  }

  function requestBody() {
    const system = $("system").value.trim();
    const messages = system ? [{ role: "system", content: system }, ...conversation] : conversation;
    const request = { model, messages, stream: true, stream_options: { include_usage: true } };
    for (const [field, id] of [["temperature", "temperature"], ["top_p", "top-p"], ["max_tokens", "max-tokens"], ["seed", "seed"]]) {
      const value = numberField(id);
      if (value !== null && !Number.isNaN(value)) request[field] = value;
    }
    return request;
  }

  function describeSpeed(tokens, started, first, ended) {
    const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
    if (first !== null && tokens > 1 && ended > first) {
      parts.push(`${((tokens - 1) / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
    }
    if (first !== null) parts.push(`first token after ${((first - started) / 1000).toFixed(2)} s`);
    return parts.join(" · ");
  }

  async function errorText(response) {
    try {
      const payload = await response.json();
      return (payload.error && payload.error.message) || `HTTP ${response.status}`;
    } catch (_) {
      return `HTTP ${response.status}`;
    }
  }

  async function ask(text) {
    const thread = conversation; // "New" during the reply starts another; this one's end stays with this one
    thread.push({ role: "user", content: text });
    const asked = bubble("user", text).parentElement;
    const content = bubble("assistant", "");
    content.parentElement.classList.add("streaming");
    controller = new AbortController();
    setState("streaming");
    statusLine.textContent = "waiting for the swarm…";
    const started = performance.now();
    let first = null, chunks = 0, tokens = null, reply = "", failure = null, stopped = false;
    try {
      const headers = { "Content-Type": "application/json" };
      if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers, body: JSON.stringify(requestBody()), signal: controller.signal,
      });
      if (response.status === 401) {
        sessionStorage.removeItem(KEY_ITEM);
        askForKey(await errorText(response));
        throw new Error("the API key was refused");
      }
      if (!response.ok) throw new Error(await errorText(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const payload = JSON.parse(data);
            if (payload.error) throw new Error(payload.error.message);
            if (payload.usage) tokens = payload.usage.completion_tokens;
            const delta = payload.choices && payload.choices[0] && payload.choices[0].delta;
            if (delta && delta.content) {
              if (first === null) first = performance.now();
              chunks += 1;
              reply += delta.content;
              content.textContent = reply;
              messagesBox.scrollTop = messagesBox.scrollHeight;
              statusLine.textContent = describeSpeed(chunks, started, first, performance.now());
            }
          }
        }
      }
    } catch (error) {
      if (error.name === "AbortError") stopped = true;
      else failure = error.message;
    }
    controller = null;
    content.parentElement.classList.remove("streaming");
    if (reply || stopped) thread.push({ role: "assistant", content: reply });
    else thread.pop(); // nothing came back: the message can be sent again
    let summary = describeSpeed(tokens === null ? chunks : tokens, started, first, performance.now());
    if (stopped) summary += " · stopped";
    if (failure) {
      if (!reply) {
        content.parentElement.remove();
        asked.remove(); // nothing came back: the message goes back to the box, to send again
        if (!prompt.value) prompt.value = text;
      }
      bubble("error", failure);
      summary = `failed: ${failure}`;
    }
    statusLine.textContent = summary;
    setState("idle");
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || body.dataset.state === "streaming") return;
    if (keyRequired && !apiKey()) return askForKey("enter the key first");
    prompt.value = "";
    ask(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  fresh.addEventListener("click", () => {
    if (controller) controller.abort();
    conversation = [];
    messagesBox.replaceChildren();
    statusLine.textContent = "new conversation";
    prompt.focus();
  });
  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = keyInput.value.trim();
    if (!key) return askForKey("the key is empty");
    sessionStorage.setItem(KEY_ITEM, key);
    keyInput.value = "";
    keyForm.hidden = true;
    keyError.textContent = "";
    setState(body.dataset.state || "idle");
    prompt.focus();
  });

  if (window.matchMedia("(max-width: 760px)").matches) $("settings").open = false;
  setState("idle");
  if (keyRequired && !apiKey()) askForKey("");
})();
