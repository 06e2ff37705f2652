// Hanlin AI search page: POST /v1/search with stream=true, shows the agent's steps as they arrive, the
// answer streaming in, then the checked answer with clickable [n] citations and the source passages.
// Documents and model output are untrusted: every piece of text goes in with textContent, never as HTML.
"use strict";

(() => {
  const { readSSE, persist } = window.HanlinWeb;
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("ask-form"), question: $("question"), ask: $("ask"), stop: $("stop"), error: $("error"),
    results: $("results"), hint: $("empty-hint"), stepsSection: $("steps-section"), steps: $("steps"),
    answerSection: $("answer-section"), answer: $("answer"), notFound: $("not-found"), note: $("answer-note"),
    sourcesSection: $("sources-section"), sources: $("sources"),
    source: $("source"), maxQueries: $("max-queries"), k: $("k"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  };
  const headers = () => window.HanlinWeb.authHeaders(
    els.apiKey, { "Content-Type": "application/json", Accept: "text/event-stream" });
  const errorMessage = (resp) => window.HanlinWeb.errorMessage(resp, els.apiKey);
  const STORE = { apiKey: "hanlin.apiKey", source: "hanlin.search.source", maxQueries: "hanlin.search.maxQueries",
                  k: "hanlin.search.k", maxTokens: "hanlin.search.maxTokens" };
  const HIT_CHARS = 300;

  let controller = null;  // AbortController of the search in flight
  let draft = "";         // the answer's raw text while it streams

  // ---- DOM helpers -------------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function isWebLink(source) {
    return /^https?:\/\//i.test(source || "");
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  function setState(state) {
    els.results.dataset.state = state;  // idle | searching | done | stopped | error
    const busy = state === "searching";
    els.ask.disabled = busy;
    els.ask.hidden = busy;
    els.stop.hidden = !busy;
  }

  function clearResults() {
    els.steps.replaceChildren();
    els.answer.replaceChildren();
    els.sources.replaceChildren();
    els.answer.dataset.text = "";
    els.answer.classList.remove("checked");
    els.notFound.hidden = true;
    els.note.hidden = true;
    els.stepsSection.hidden = true;
    els.answerSection.hidden = true;
    els.sourcesSection.hidden = true;
    draft = "";
  }

  function passageHeading(item) {
    const head = el("div", "passage-head");
    head.appendChild(el("span", "passage-title", item.title || item.source || "(untitled)"));
    if (item.location) head.appendChild(el("span", "passage-location", item.location));
    return head;
  }

  // ---- steps -------------------------------------------------------------------------------------

  function addStep(kind, title) {
    els.stepsSection.hidden = false;
    els.hint.hidden = true;
    const li = el("li", `step ${kind}`);
    li.dataset.step = kind;
    li.appendChild(el("div", "step-title", title));
    els.steps.appendChild(li);
    return li;
  }

  function showPlan(data) {
    const li = addStep("plan", data.fallback ? "Plan (searching the question itself)" : "Plan");
    const list = el("ul", "queries");
    for (const q of data.queries || []) list.appendChild(el("li", "query", q));
    li.appendChild(list);
  }

  function showSearch(data) {
    const hits = data.hits || [];
    const li = addStep("search", `Searched “${data.query || ""}” — ${hits.length} hit${hits.length === 1 ? "" : "s"}`);
    const list = el("ul", "hits");
    for (const hit of hits) {
      const item = el("li", "hit");
      item.appendChild(passageHeading(hit));
      const text = String(hit.text || "");
      item.appendChild(el("div", "hit-text", text.length > HIT_CHARS ? text.slice(0, HIT_CHARS) + "…" : text));
      list.appendChild(item);
    }
    li.appendChild(list);
  }

  function showRead(data) {
    const passages = data.passages || [];
    const li = addStep("read", `Read ${passages.length} passage${passages.length === 1 ? "" : "s"}`);
    const list = el("ol", "read-list");
    for (const p of passages) {
      const item = el("li", "read-item");
      item.appendChild(el("span", "read-id", `[${p.id}]`));
      item.appendChild(el("span", "passage-title", p.title || p.source || ""));
      if (p.location) item.appendChild(el("span", "passage-location", p.location));
      list.appendChild(item);
    }
    li.appendChild(list);
  }

  // ---- the answer --------------------------------------------------------------------------------

  function showDelta(data) {
    els.answerSection.hidden = false;
    els.hint.hidden = true;
    draft += data.text || "";
    els.answer.textContent = draft;
    els.answer.dataset.text = draft;
    els.answer.classList.add("streaming");
  }

  // Text with [n] markers → text nodes and citation links to source n (see linkCitations).
  function appendCited(parent, text) {
    const re = /\[(\d+)\]/g;
    let last = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      const n = Number(m[1]);
      parent.appendChild(citation(n));
      last = re.lastIndex;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function citation(n) {
    const a = el("a", "cite", `[${n}]`);
    a.href = `#source-${n}`;
    a.dataset.source = String(n);
    a.addEventListener("click", (e) => { e.preventDefault(); focusSource(n); });
    return a;
  }

  function showAnswer(data) {
    els.answerSection.hidden = false;
    els.answer.classList.remove("streaming");
    els.answer.classList.add("checked");
    els.answer.replaceChildren();
    const text = String(data.text || "");
    els.answer.dataset.text = text;
    els.answer.dataset.raw = draft;
    const sentences = Array.isArray(data.sentences) ? data.sentences : [];
    if (sentences.length) {
      sentences.forEach((s, i) => {
        const span = el("span", "sentence");
        span.dataset.index = String(i);
        const body = String(s.text || "");
        appendCited(span, body);
        // Citations the sentence carries but does not show inline go after it.
        const inline = new Set([...body.matchAll(/\[(\d+)\]/g)].map((m) => Number(m[1])));
        for (const n of (Array.isArray(s.citations) ? s.citations : []).map(Number)) {
          if (inline.has(n)) continue;
          span.appendChild(document.createTextNode(" "));
          span.appendChild(citation(n));
        }
        if (s.supported === false) {
          span.classList.add("unsupported");
          span.title = "No cited source supports this sentence";
        }
        els.answer.appendChild(span);
        els.answer.appendChild(document.createTextNode(" "));
      });
    } else {
      appendCited(els.answer, text);
    }
    els.notFound.hidden = !data.not_found;
    const unsupported = sentences.filter((s) => s.supported === false).length;
    const dropped = (data.dropped_citations || []).length;
    const notes = [];
    if (unsupported) notes.push(`${unsupported} sentence${unsupported === 1 ? "" : "s"} not supported by a cited source (marked)`);
    if (dropped) notes.push(`${dropped} citation${dropped === 1 ? "" : "s"} dropped by the check`);
    els.note.textContent = notes.join("; ");
    els.note.hidden = notes.length === 0;
  }

  // Citations to sources that did not come back stay as plain text.
  function linkCitations() {
    for (const a of els.answer.querySelectorAll("a.cite")) {
      if (!$(`source-${a.dataset.source}`)) a.replaceWith(document.createTextNode(a.textContent));
    }
  }

  // ---- sources -----------------------------------------------------------------------------------

  function showSources(data) {
    const sources = data.sources || [];
    els.sourcesSection.hidden = sources.length === 0;
    els.sources.replaceChildren();
    for (const s of sources) {
      const li = el("li", "source");
      li.id = `source-${s.id}`;
      li.value = Number(s.id) || 0;
      li.dataset.source = String(s.id);
      if (s.cited) li.classList.add("cited");
      li.appendChild(passageHeading(s));
      const where = el("div", "source-where");
      if (isWebLink(s.source)) {
        const a = el("a", "source-link", s.source);
        a.href = s.source;
        a.target = "_blank";
        a.rel = "noopener noreferrer";
        where.appendChild(a);
      } else {
        where.appendChild(el("code", "source-path", s.source || ""));
      }
      li.appendChild(where);
      li.appendChild(el("blockquote", "passage", s.text || ""));
      els.sources.appendChild(li);
    }
    linkCitations();
  }

  function focusSource(n) {
    const target = $(`source-${n}`);
    if (!target) return;
    for (const li of els.sources.querySelectorAll(".highlight")) li.classList.remove("highlight");
    target.classList.add("highlight");
    target.scrollIntoView({ behavior: "smooth", block: "center" });
  }

  // ---- HTTP --------------------------------------------------------------------------------------

  class SearchFailed extends Error {}

  const HANDLERS = {
    plan: showPlan, search: showSearch, read: showRead, answer_delta: showDelta, answer: showAnswer,
    sources: showSources,
  };

  function intSetting(input, lo, hi) {
    const v = parseInt(input.value, 10);
    return Number.isFinite(v) ? Math.min(hi, Math.max(lo, v)) : null;
  }

  async function ask() {
    const question = els.question.value.trim();
    if (!question || controller) return;
    showError("");
    clearResults();
    const ctrl = new AbortController();
    controller = ctrl;
    setState("searching");
    let state = "done";
    try {
      const payload = { query: question, stream: true, source: els.source.value };
      const maxQueries = intSetting(els.maxQueries, 1, 5);
      const k = intSetting(els.k, 1, 8);
      const maxTokens = intSetting(els.maxTokens, 1, 1 << 20);
      if (maxQueries !== null) payload.max_queries = maxQueries;
      if (k !== null) payload.k = k;
      if (maxTokens !== null) payload.max_tokens = maxTokens;
      const resp = await fetch("/v1/search", {
        method: "POST", headers: headers(), body: JSON.stringify(payload), signal: ctrl.signal,
      });
      if (!resp.ok) throw new SearchFailed(await errorMessage(resp));
      let finished = false;
      await readSSE(resp.body, (data) => {
        if (finished) return;
        if (data === "[DONE]") { finished = true; return; }
        let event;
        try { event = JSON.parse(data); } catch { return; }
        if (event.type === "error") throw new SearchFailed(event.message || "the search failed");
        if (event.type === "done") { finished = true; return; }
        const handler = HANDLERS[event.type];
        if (handler) handler(event);
      });
      if (!finished) throw new SearchFailed("The connection closed before the search finished.");
    } catch (e) {
      if (ctrl.signal.aborted) {
        state = "stopped";
      } else {
        state = "error";
        showError(e instanceof SearchFailed ? e.message : `Request failed: ${e.message}`);
        ctrl.abort();
      }
    } finally {
      if (controller === ctrl) controller = null;
    }
    els.answer.classList.remove("streaming");
    if (state === "stopped") {
      els.note.textContent = "stopped";
      els.note.hidden = false;
    }
    setState(state);
  }

  function stop() {
    if (controller) controller.abort();
  }

  // ---- settings and events -----------------------------------------------------------------------

  persist(els.apiKey, STORE.apiKey);  // shared with the chat page
  persist(els.source, STORE.source);
  persist(els.maxQueries, STORE.maxQueries);
  persist(els.k, STORE.k);
  persist(els.maxTokens, STORE.maxTokens);

  els.form.addEventListener("submit", (e) => { e.preventDefault(); ask(); });
  els.stop.addEventListener("click", stop);

  // For tests and the curious.
  window.hanlinSearch = { ask, stop, focusSource };

  setState("idle");
  els.question.focus();
})();
