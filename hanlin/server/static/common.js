// What the chat page (app.js) and the search page (search.js) share: the API key header, error messages
// from non-2xx responses, an SSE reader and settings kept in localStorage. Loaded before either page's script.
"use strict";

window.HanlinWeb = (() => {
  // Request headers with `Authorization: Bearer <key>` when the key input holds one.
  function authHeaders(apiKeyInput, extra = {}) {
    const h = { ...extra };
    const key = apiKeyInput.value.trim();
    if (key) h["Authorization"] = `Bearer ${key}`;
    return h;
  }

  // A readable message from a non-2xx response ({"error": {"message": ...}} or anything else).
  async function errorMessage(resp, apiKeyInput) {
    if (resp.status === 401) {
      return apiKeyInput.value.trim()
        ? "The server refused this API key (401). Check the key under Settings."
        : "This server needs an API key (401). Enter it under Settings.";
    }
    let detail = "";
    try {
      const text = await resp.text();
      try {
        const body = JSON.parse(text);
        detail = (body && body.error && (body.error.message || body.error)) || body.detail || text;
        if (typeof detail !== "string") detail = JSON.stringify(detail);
      } catch { detail = text; }
    } catch { /* body unreadable */ }
    return `Error ${resp.status}${detail ? ": " + detail : ""}`;
  }

  // Reads an SSE body; calls onEvent(data) for each event's data ("[DONE]" included).
  async function readSSE(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    const flushLine = (line) => {
      if (line === "") {               // blank line: end of one event
        if (data.length) onEvent(data.join("\n"));
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line[5] === " " ? 6 : 5));
      }                                // comments (":"), event:, id:, retry: are ignored
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let i;
      while ((i = buffer.search(/\r\n|\r|\n/)) >= 0) {
        const sep = buffer[i] === "\r" && buffer[i + 1] === "\n" ? 2 : 1;
        if (buffer[i] === "\r" && i + 1 === buffer.length) break;  // maybe a split "\r\n": wait
        flushLine(buffer.slice(0, i));
        buffer = buffer.slice(i + sep);
      }
    }
    buffer += decoder.decode();
    if (buffer) flushLine(buffer.replace(/\r$/, ""));
    flushLine("");
  }

  // Restores an input from localStorage and saves it on change (an empty value removes the key).
  function persist(input, key) {
    const saved = localStorage.getItem(key);
    if (saved !== null) input.value = saved;
    input.addEventListener("change", () => {
      const v = input.value.trim();
      if (v) localStorage.setItem(key, v); else localStorage.removeItem(key);
    });
  }

  return { authHeaders, errorMessage, readSSE, persist };
})();
