// Hanlin web chat: talks to this server's OpenAI-compatible API, streams answers over SSE.
// No build step, no network beyond this server. Markdown goes through marked, then DOMPurify.
"use strict";

(() => {
  const { readSSE, persist } = window.HanlinWeb;
  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model-name"), messages: $("messages"), hint: $("empty-hint"), error: $("error"),
    form: $("composer"), input: $("input"), send: $("send"), stop: $("stop"), newChat: $("new-chat"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"), settings: $("settings"),
  };
  const headers = (extra) => window.HanlinWeb.authHeaders(els.apiKey, extra);
  const errorMessage = (resp) => window.HanlinWeb.errorMessage(resp, els.apiKey);
  const STORE = { apiKey: "hanlin.apiKey", temperature: "hanlin.temperature", maxTokens: "hanlin.maxTokens" };

  let conversation = []; // [{role: "user"|"assistant", content}], sent in full each turn (no system message)
  let modelId = null;
  let controller = null; // AbortController of the request in flight, or null

  // ---- rendering -------------------------------------------------------------------------------

  // Model output is untrusted: no raw HTML may run, no remote resource may load.
  const PURIFY = {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "video", "audio"],
    FORBID_ATTR: ["style"],
  };
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  function renderMarkdown(text) {
    const html = marked.parse(text, { gfm: true, breaks: true, async: false });
    return DOMPurify.sanitize(html, PURIFY);
  }

  function nearBottom() {
    const m = els.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function addMessage(role, text) {
    els.hint.hidden = true;
    const div = document.createElement("div");
    div.className = `message ${role}`;
    div.dataset.testid = `message-${role}`;
    const body = document.createElement("div");
    body.className = "body";
    div.appendChild(body);
    els.messages.appendChild(div);
    setMessageText(div, text);
    els.messages.scrollTop = els.messages.scrollHeight;
    return div;
  }

  function setMessageText(div, text) {
    const stick = nearBottom();
    const body = div.querySelector(".body");
    if (div.classList.contains("user")) body.textContent = text;  // the user's own words, shown as typed
    else body.innerHTML = renderMarkdown(text);
    div.dataset.text = text;  // the raw text, for tests and copy
    if (stick) els.messages.scrollTop = els.messages.scrollHeight;
  }

  function setNote(div, note) {
    let n = div.querySelector(".note");
    if (!n) {
      n = document.createElement("div");
      n.className = "note";
      div.appendChild(n);
    }
    n.textContent = note;
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  function setStreaming(on) {
    els.send.disabled = on;
    els.send.hidden = on;
    els.stop.hidden = !on;
    document.body.classList.toggle("streaming", on);
  }

  // ---- HTTP ------------------------------------------------------------------------------------

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (!resp.ok) {
        els.model.textContent = "(model unknown)";
        showError(await errorMessage(resp));
        return;
      }
      const body = await resp.json();
      const first = body && Array.isArray(body.data) && body.data[0];
      modelId = first ? first.id : null;
      els.model.textContent = modelId || "(no model)";
      if (els.error.textContent.includes("401")) showError("");
    } catch (e) {
      els.model.textContent = "(server unreachable)";
      showError(`Cannot reach the server: ${e.message}`);
    }
  }

  class StreamError extends Error {}

  // ---- chat ------------------------------------------------------------------------------------

  function numberSetting(input, fallback) {
    const v = parseFloat(input.value);
    return Number.isFinite(v) ? v : fallback;
  }

  async function send() {
    const text = els.input.value.trim();
    if (!text || controller) return;
    showError("");
    els.input.value = "";
    conversation.push({ role: "user", content: text });
    const userDiv = addMessage("user", text);
    const div = addMessage("assistant", "");
    div.dataset.state = "streaming";
    div.classList.add("streaming");

    const ctrl = new AbortController();
    controller = ctrl;
    setStreaming(true);
    let answer = "";
    let finish = null;
    let state = "done";
    try {
      const payload = {
        messages: conversation.map(({ role, content }) => ({ role, content })),
        stream: true,
        temperature: numberSetting(els.temperature, 0.7),
        max_tokens: Math.max(1, Math.round(numberSetting(els.maxTokens, 256))),
      };
      if (modelId) payload.model = modelId;
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
        body: JSON.stringify(payload),
        signal: ctrl.signal,
      });
      if (!resp.ok) throw new StreamError(await errorMessage(resp));
      const type = resp.headers.get("content-type") || "";
      if (!type.includes("text/event-stream")) {
        // A JSON body where a stream was asked for: an error or an unstreamed completion.
        const body = await resp.json();
        if (body.error) throw new StreamError(body.error.message || JSON.stringify(body.error));
        answer = body.choices?.[0]?.message?.content ?? "";
        finish = body.choices?.[0]?.finish_reason ?? null;
        setMessageText(div, answer);
      } else {
        let ended = false;
        await readSSE(resp.body, (data) => {
          if (ended) return;
          if (data === "[DONE]") { ended = true; return; }
          let chunk;
          try { chunk = JSON.parse(data); } catch { return; }
          if (chunk.error) throw new StreamError(chunk.error.message || JSON.stringify(chunk.error));
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) return;
          const piece = (choice.delta && choice.delta.content) || "";
          if (piece) {
            answer += piece;
            setMessageText(div, answer);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        });
        if (!ended && !finish) throw new StreamError("The connection closed before the answer was complete.");
      }
    } catch (e) {
      if (ctrl.signal.aborted) {
        state = "stopped";
      } else {
        state = "error";
        showError(e instanceof StreamError ? e.message : `Request failed: ${e.message}`);
        ctrl.abort();  // an error event mid-stream: close the connection too
      }
    } finally {
      if (controller === ctrl) {
        controller = null;
        setStreaming(false);
      }
    }

    div.classList.remove("streaming");
    div.dataset.state = state;
    if (state === "stopped") {
      div.classList.add("stopped");
      setNote(div, "stopped");
    } else if (state === "done" && finish === "length") {
      setNote(div, "cut off at max tokens");
    }
    if (!div.isConnected) return;  // "New chat" while streaming: nothing left to keep
    if (answer) {
      conversation.push({ role: "assistant", content: answer });
    } else {
      // Nothing came back (error, or stopped before the first token): drop the turn and give the
      // words back so the user can retry.
      conversation.pop();
      div.remove();
      userDiv.remove();
      if (!els.input.value) els.input.value = text;
      els.hint.hidden = conversation.length > 0;
    }
    els.input.focus();
  }

  function stop() {
    if (controller) controller.abort();
  }

  function newChat() {
    stop();
    controller = null;  // the aborted turn finishes on its own; its message is gone already
    setStreaming(false);
    conversation = [];
    els.messages.querySelectorAll(".message").forEach((m) => m.remove());
    els.hint.hidden = false;
    showError("");
    els.input.value = "";
    els.input.focus();
  }

  // ---- settings and events ---------------------------------------------------------------------

  persist(els.apiKey, STORE.apiKey);
  persist(els.temperature, STORE.temperature);
  persist(els.maxTokens, STORE.maxTokens);
  els.apiKey.addEventListener("change", loadModel);  // a new key may unlock /v1/models

  els.form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  els.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  els.stop.addEventListener("click", stop);
  els.newChat.addEventListener("click", newChat);

  // For tests and the curious: the same functions the page uses.
  window.hanlin = { renderMarkdown, send, stop, newChat, history: () => conversation.slice() };

  loadModel();
  els.input.focus();
})();
