// hearth's chat page: plain JS over the OpenAI-compatible API (GET /v1/models, streamed
// POST /v1/chat/completions). The conversation, settings and API key stay in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "hearth.chat";
const KEY_STORE = "hearth.apiKey";
const PARAMS = ["system", "temperature", "top_p", "max_tokens"];

let state = { model: "", system: "", temperature: "0.7", top_p: "1", max_tokens: "512",
  messages: [] };
let controller = null; // the AbortController of the request in flight

function load() {
  try {
    state = { ...state, ...JSON.parse(localStorage.getItem(STORE) || "{}") };
  } catch (err) {
    console.warn("hearth: stored conversation unreadable, starting over", err);
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(state));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORE);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const select = $("model");
  const problem = $("models-error");
  problem.hidden = true;
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (err) {
    problem.textContent = `Cannot reach the server: ${err}`;
    problem.hidden = false;
    return;
  }
  if (response.status === 401) {
    $("api-key-row").hidden = false;
    problem.textContent = localStorage.getItem(KEY_STORE)
      ? "That API key was refused." : "This server needs an API key.";
    problem.hidden = false;
    select.replaceChildren();
    return;
  }
  if (!response.ok) {
    problem.textContent = await errorText(response);
    problem.hidden = false;
    return;
  }
  const models = (await response.json()).data;
  const ids = models.map((m) => m.id);
  // a model loaded on demand shows its state (loaded, loading, unloaded: loads on first use)
  const label = (m) => (m.state && m.state !== "loaded" ? `${m.id} (${m.state})` : m.id);
  select.replaceChildren(...models.map((m) => new Option(label(m), m.id)));
  if (ids.includes(state.model)) select.value = state.model;
  state.model = select.value;
  updateButtons();
}

// --- rendering ---

function statsText(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.stopped) parts.push("stopped");
  if (stats.tokensPerSecond) parts.push(`${stats.tokensPerSecond.toFixed(1)} tok/s`);
  if (stats.usage) {
    const u = stats.usage;
    parts.push(`${u.prompt_tokens} prompt + ${u.completion_tokens} completion = ` +
      `${u.total_tokens} tokens`);
  } else if (stats.chunks) {
    parts.push(`~${stats.chunks} tokens (no usage: the request ended early)`);
  }
  if (stats.finishReason) parts.push(`finish: ${stats.finishReason}`);
  if (stats.seconds) parts.push(`${stats.seconds.toFixed(2)} s`);
  return parts.join(" · ");
}

function messageElement(message) {
  const el = document.createElement("div");
  el.className = `msg ${message.role}`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role === "user" ? "You" : (message.model || "assistant");
  el.append(role);
  if (message.role === "assistant") {
    const details = document.createElement("details");
    details.className = "reasoning";
    details.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const thinking = document.createElement("div");
    thinking.className = "reasoning-text";
    details.append(summary, thinking);
    const content = document.createElement("div");
    content.className = "content";
    const error = document.createElement("div");
    error.className = "error";
    const stats = document.createElement("div");
    stats.className = "stats";
    el.append(details, content, error, stats);
  } else {
    const content = document.createElement("div");
    content.className = "content";
    el.append(content);
  }
  updateMessage(el, message);
  return el;
}

function updateMessage(el, message) {
  el.dataset.state = message.state || "done";
  const content = el.querySelector(".content");
  if (message.role !== "assistant") {
    content.textContent = message.content;
    return;
  }
  content.innerHTML = HearthMarkdown.render(message.content || "");
  const details = el.querySelector("details.reasoning");
  details.hidden = !message.reasoning;
  details.querySelector(".reasoning-text").textContent = message.reasoning || "";
  el.querySelector(".error").textContent = message.error || "";
  el.querySelector(".stats").textContent = statsText(message.stats);
}

function renderAll() {
  const box = $("messages");
  box.replaceChildren(...state.messages.map(messageElement));
  box.scrollTop = box.scrollHeight;
}

function updateButtons() {
  const busy = controller !== null;
  $("send").disabled = busy || !$("model").value;
  $("stop").disabled = !busy;
  $("new-chat").disabled = busy;
}

// --- streaming ---

// Yields each SSE event's data from a fetch response body.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

function requestBody() {
  const messages = [];
  if (state.system.trim()) messages.push({ role: "system", content: state.system });
  for (const m of state.messages) {
    if (m.role === "user" || (m.role === "assistant" && m.content)) {
      messages.push({ role: m.role, content: m.content });
    }
  }
  const body = { model: state.model, messages, stream: true,
    stream_options: { include_usage: true } };
  const numbers = { temperature: parseFloat, top_p: parseFloat, max_tokens: parseInt };
  for (const [name, parse] of Object.entries(numbers)) {
    const value = parse(state[name]);
    if (!Number.isNaN(value)) body[name] = value;
  }
  return body;
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  const body = requestBody();
  const answer = { role: "assistant", model: state.model, content: "", reasoning: "",
    state: "streaming", stats: { chunks: 0 } };
  state.messages.push(answer);
  save();
  renderAll();
  const el = $("messages").lastElementChild;
  controller = new AbortController();
  updateButtons();
  const started = performance.now();
  let first = null;
  let pending = false;
  const paint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const box = $("messages");
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
      updateMessage(el, answer);
      if (atBottom) box.scrollTop = box.scrollHeight;
    });
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) {
      if (response.status === 401) $("api-key-row").hidden = false;
      throw new Error(await errorText(response));
    }
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) answer.stats.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        const thinking = delta.reasoning_content ?? delta.reasoning;
        if (thinking || delta.content) {
          if (first === null) first = performance.now();
          answer.stats.chunks += 1;
        }
        if (thinking) answer.reasoning += thinking;
        if (delta.content) answer.content += delta.content;
        if (choice.finish_reason) answer.stats.finishReason = choice.finish_reason;
      }
      paint();
    }
    answer.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      answer.state = "stopped";
      answer.stats.stopped = true;
    } else {
      answer.state = "error";
      answer.error = String(err.message || err);
    }
  } finally {
    const end = performance.now();
    answer.stats.seconds = (end - started) / 1000;
    const tokens = answer.stats.usage ? answer.stats.usage.completion_tokens : answer.stats.chunks;
    if (first !== null && tokens > 1 && end > first) {
      // after the first token: the decode rate, not the time to first token
      answer.stats.tokensPerSecond = (tokens - 1) / ((end - first) / 1000);
    }
    controller = null;
    save();
    updateMessage(el, answer);
    updateButtons();
    loadModels(); // the models' states changed (a first use loads, a load may evict)
  }
}

// --- wiring ---

function init() {
  load();
  for (const name of PARAMS) {
    const input = $(name);
    input.value = state[name];
    input.addEventListener("input", () => {
      state[name] = input.value;
      save();
    });
  }
  $("model").addEventListener("change", () => {
    state.model = $("model").value;
    save();
    updateButtons();
  });
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  const useKey = () => {
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    loadModels();
  };
  $("api-key-save").addEventListener("click", useKey);
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") useKey();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (!text.trim() || controller || !$("model").value) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => {
    if (controller) controller.abort();
  });
  $("new-chat").addEventListener("click", () => {
    state.messages = [];
    save();
    renderAll();
  });
  // a reply cut off by a reload mid-stream is kept as stopped
  for (const m of state.messages) {
    if (m.state === "streaming") {
      m.state = "stopped";
      m.stats = { ...(m.stats || {}), stopped: true };
    }
  }
  renderAll();
  updateButtons();
  loadModels();
}

init();
