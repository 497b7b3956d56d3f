// The server's public API, as the page uses it: JSON requests with the stored API key, a key
// prompt on 401, job events over a streamed fetch (EventSource cannot send Authorization),
// and asset images fetched with the key and shown through object URLs.

const KEY_STORAGE = "kiln.apiKey";

/** An API answer that was not 2xx, with the server's own message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function storedKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

let pendingKey = null;
const connectionListeners = [];

/** Calls `listener(true|false)` when requests lose or regain the server. */
export function onConnection(listener) {
  connectionListeners.push(listener);
}

function setConnected(ok) {
  for (const l of connectionListeners) l(ok);
}

/** Shows the key dialog (once, however many requests are waiting) and resolves with the key. */
export function askForKey(reason) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason || "This server needs an API key.";
  input.value = "";
  pendingKey = new Promise((resolve) => {
    const onClose = () => {
      const key = input.value.trim();
      if (!key) {
        // Closed without a key (Esc): ask again, the page cannot work without one.
        dialog.showModal();
        return;
      }
      dialog.removeEventListener("close", onClose);
      localStorage.setItem(KEY_STORAGE, key);
      pendingKey = null;
      resolve(key);
      document.dispatchEvent(new CustomEvent("kiln:key-changed"));
    };
    dialog.addEventListener("close", onClose);
    dialog.showModal();
    input.focus();
  });
  return pendingKey;
}

function headers(extra) {
  const h = new Headers(extra || {});
  const key = storedKey();
  if (key) h.set("Authorization", `Bearer ${key}`);
  return h;
}

async function errorMessage(res) {
  const text = await res.text();
  try {
    const body = JSON.parse(text);
    return body?.error?.message || body?.detail || text;
  } catch {
    return text || `${res.status} ${res.statusText}`;
  }
}

/**
 * fetch with the key; on 401 asks for a key and retries; throws ApiError on other non-2xx.
 * A GET that cannot reach the server is retried until it can (the page shows "offline"
 * meanwhile); anything else throws, so the user sees that the action did not happen.
 */
export async function request(path, options = {}) {
  let pause = 250;
  for (;;) {
    const sent = storedKey();
    let res;
    try {
      res = await fetch(path, { ...options, headers: headers(options.headers) });
    } catch (e) {
      if ((options.method || "GET") !== "GET") throw e;
      setConnected(false);
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 5000);
      continue;
    }
    setConnected(true);
    if (res.status === 401) {
      const message = await errorMessage(res);
      // A key entered while this request was on its way: retry with it instead of asking again.
      if (storedKey() === sent) await askForKey(message);
      continue;
    }
    if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
    return res;
  }
}

export async function getJson(path) {
  return (await request(path)).json();
}

export async function postJson(path, body) {
  const res = await request(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return res.json();
}

export async function del(path) {
  return (await request(path, { method: "DELETE" })).json();
}

/** Queues a job spec; the queued job (id, state, lane, position). */
export function submitJob(spec) {
  return postJson("/v1/jobs", spec);
}

/** Stores a PNG blob as an upload; its sha256 for `{"upload": ...}`. */
export async function upload(blob) {
  const res = await request("/v1/uploads", { method: "POST", headers: { "Content-Type": "image/png" }, body: blob });
  return (await res.json()).upload;
}

const TERMINAL = new Set(["done", "failed", "cancelled"]);

/** Reads one SSE response, calling onEvent per event; true when a terminal event was seen. */
async function readEvents(res, onEvent) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let ended = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return ended;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("data:")) data += line.slice(5).trimStart();
      }
      if (!data) continue; // keep-alive comment
      const event = JSON.parse(data);
      event.receivedAt = performance.now();
      if (TERMINAL.has(event.event)) ended = true;
      onEvent(event);
    }
  }
}

/** The terminal event a finished job's row stands for (after a reconnect missed it). */
function endOf(job) {
  if (job.state === "done") return { event: "done", result: job.result || {} };
  if (job.state === "failed") return { event: "failed", error: job.error || "failed" };
  if (job.state === "cancelled") return { event: "cancelled" };
  return null;
}

// Following jobs. A browser opens at most six HTTP/1.1 connections to a server and every event
// stream holds one, so a stream is opened only for a job that is running (or next, or ended:
// its stream replays everything and closes); jobs further back in the queue are followed by one
// shared poll of GET /v1/jobs, which also gives their positions. One worker runs one job at a
// time, so this keeps one or two streams open however many jobs wait.

/** id -> {handlers: [fn], streaming, position} */
const followed = new Map();
let pollTimer = null;

function emit(id, event) {
  const f = followed.get(id);
  if (!f) return;
  if (TERMINAL.has(event.event)) followed.delete(id);
  for (const h of f.handlers) {
    try {
      const r = h(event);
      if (r && r.catch) r.catch((e) => console.warn(e));
    } catch (e) {
      console.warn(e);
    }
  }
}

/**
 * Follows job `id` until it ends, calling onEvent per event. A dropped stream is reopened after
 * a pause (the server replays the job's events from the start, so handlers must be
 * idempotent); the job's row is read first, so a job that ended meanwhile still reports its end.
 */
export function watchJob(id, onEvent, job = null) {
  const f = followed.get(id);
  if (f) {
    f.handlers.push(onEvent);
    return;
  }
  followed.set(id, { handlers: [onEvent], streaming: false, position: null });
  if (!job || job.state !== "queued" || (job.position ?? 0) === 0) stream(id);
  else schedulePoll(300);
}

async function stream(id) {
  const f = followed.get(id);
  if (!f || f.streaming) return;
  f.streaming = true;
  let pause = 250;
  for (;;) {
    try {
      const res = await request(`/v1/jobs/${id}/events`);
      setConnected(true);
      const ended = await readEvents(res, (ev) => emit(id, ev));
      if (ended) break;
    } catch (e) {
      if (e instanceof ApiError && e.status !== 503) {
        emit(id, { event: "failed", error: e.message, receivedAt: performance.now() });
        break;
      }
      setConnected(false);
    }
    await new Promise((r) => setTimeout(r, pause));
    pause = Math.min(pause * 2, 5000);
    try {
      const end = endOf(await getJson(`/v1/jobs/${id}`));
      if (end) {
        setConnected(true);
        end.receivedAt = performance.now();
        emit(id, end);
        break;
      }
    } catch {
      setConnected(false);
    }
  }
  // The next job has probably just started: look now rather than at the next tick.
  schedulePoll(0);
}

function schedulePoll(ms) {
  if (pollTimer != null) {
    if (ms > 0) return;
    clearTimeout(pollTimer);
  }
  pollTimer = setTimeout(pollQueued, ms);
}

async function pollQueued() {
  pollTimer = null;
  const waiting = [...followed.entries()].filter(([, f]) => !f.streaming);
  if (waiting.length === 0) return;
  let jobs;
  try {
    jobs = new Map((await getJson("/v1/jobs?limit=1000")).jobs.map((j) => [j.id, j]));
    setConnected(true);
  } catch {
    setConnected(false);
    schedulePoll(1000);
    return;
  }
  for (const [id, f] of waiting) {
    const job = jobs.get(id);
    if (job && job.state === "queued") {
      if (f.position !== job.position) {
        f.position = job.position;
        emit(id, { event: "queued", position: job.position, receivedAt: performance.now() });
      }
    } else {
      stream(id); // running, ended, or off the list: the stream tells
    }
  }
  if ([...followed.values()].some((f) => !f.streaming)) schedulePoll(300);
}

const imageUrls = new Map();

/** An object URL for the asset's image (fetched once with the key). */
export function assetImageUrl(id) {
  if (!imageUrls.has(id)) {
    const p = request(`/v1/assets/${id}/image`)
      .then((r) => r.blob())
      .then((b) => URL.createObjectURL(b));
    p.catch(() => imageUrls.delete(id));
    imageUrls.set(id, p);
  }
  return imageUrls.get(id);
}

/** Sets an <img>'s source to asset `id` and resolves once it is decoded and can be painted. */
export async function showAsset(img, id) {
  img.src = await assetImageUrl(id);
  await img.decode();
  return img;
}

/** Who our key belongs to ({owner, quota_credits_per_day}). */
export function me() {
  return getJson("/v1/me");
}

/** The first image of a finished job's result (a sheet left out): {asset_id, seed, role}. */
export function resultImages(result) {
  return (result?.images || []).filter((i) => i.role !== "sheet");
}

export function fmtCredits(c) {
  return c == null ? "–" : Number(c).toFixed(c >= 10 ? 2 : 4);
}

export function fmtSeconds(s) {
  return s == null ? "–" : s < 10 ? `${Number(s).toFixed(2)} s` : `${Number(s).toFixed(0)} s`;
}

/** Creates an element: el("div", {class: "x", onclick}, child, "text"...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c != null && c !== false) node.append(c);
  }
  return node;
}

/** Shows an error (the API's message) in `node`, or clears it. */
export function showError(node, error) {
  node.textContent = error ? error.message || String(error) : "";
}
