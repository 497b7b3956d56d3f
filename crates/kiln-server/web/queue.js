// The queue: my jobs or everyone's (owner, lane, position, progress, ETA), cancel my own.
// It re-reads GET /v1/jobs on a timer and as soon as a dropped connection comes back, so what
// it shows is always the server's state, not a guess kept in the page.

import { del, el, fmtSeconds, getJson, showError, watchJob } from "./api.js";

const $ = (id) => document.getElementById(id);
let owner = null;
let showAll = false;
let timer = null;
/** The running job we follow for its step progress: {id, step, steps, stepSeconds}. */
let live = null;

export function setOwner(name) {
  owner = name;
}

export function initQueue() {
  const mine = $("queue-mine");
  const all = $("queue-all");
  const set = (everyone) => {
    showAll = everyone;
    mine.setAttribute("aria-pressed", String(!everyone));
    all.setAttribute("aria-pressed", String(everyone));
    refreshQueue();
  };
  mine.addEventListener("click", () => set(false));
  all.addEventListener("click", () => set(true));
  window.addEventListener("online", refreshQueue);
  // The badge counts my unfinished jobs on every tab, so poll slowly even when hidden.
  timer = setInterval(refreshQueue, 1500);
}

function follow(job) {
  if (live?.id === job.id) return;
  live = { id: job.id, step: 0, steps: 0, stepSeconds: null };
  const mine = live;
  watchJob(job.id, (ev) => {
    if (ev.event === "step") {
      mine.step = ev.step;
      mine.steps = ev.steps;
      mine.stepSeconds = ev.seconds;
    }
  }, job);
}

/** Seconds a job of this kind took lately (median of finished ones), for ETAs. */
function typicalSeconds(jobs, kind) {
  const d = jobs
    .filter((j) => j.kind === kind && j.state === "done" && j.started_at && j.finished_at)
    .map((j) => j.finished_at - j.started_at)
    .sort((a, b) => a - b);
  return d.length ? d[Math.floor(d.length / 2)] : null;
}

let reading = false;

export async function refreshQueue() {
  // While the server is unreachable one read waits for it (see request()); the timer's
  // later ticks do not pile up behind it. Its answer re-syncs everything.
  if (reading) return;
  reading = true;
  let jobs;
  try {
    jobs = (await getJson("/v1/jobs?limit=100")).jobs;
    showError($("queue-error"), null);
  } catch (e) {
    showError($("queue-error"), e);
    return;
  } finally {
    reading = false;
  }
  const open = jobs.filter((j) => j.state === "queued" || j.state === "running");
  const myOpen = open.filter((j) => j.owner === owner).length;
  $("queue-count").textContent = myOpen ? String(myOpen) : "";
  const running = jobs.find((j) => j.state === "running");
  if (running) follow(running);
  if ($("tab-queue").hidden) return;
  let remaining = 0;
  if (running && live?.id === running.id && live.steps && live.stepSeconds != null) {
    remaining = (live.steps - live.step) * live.stepSeconds;
  }
  const rows = jobs.filter((j) => showAll || j.owner === owner).map((j) => {
    const mine = j.owner === owner;
    let progress = "";
    let eta = "";
    if (j.state === "running" && live?.id === j.id && live.steps) {
      progress = el("progress", { max: live.steps, value: live.step, title: `step ${live.step}/${live.steps}` });
      eta = fmtSeconds(remaining);
    } else if (j.state === "queued") {
      const each = typicalSeconds(jobs, j.kind);
      if (each != null) eta = `~${fmtSeconds(remaining + (j.position ?? 0) * each + each)}`;
    } else if (j.state === "done" && j.started_at && j.finished_at) {
      progress = `took ${fmtSeconds(j.finished_at - j.started_at)}`;
    }
    const cancel = mine && (j.state === "queued" || j.state === "running")
      ? el("button", { class: "cancel-job", text: "Cancel", onclick: () => cancelJob(j.id) })
      : "";
    return el("tr", { "data-job": j.id, "data-state": j.state, class: mine ? "mine" : "" },
      el("td", { text: `#${j.id}` }),
      el("td", {}, j.owner, mine ? el("span", { class: "badge you", text: "you" }) : ""),
      el("td", { text: j.kind }), el("td", { text: j.lane }), el("td", { text: j.tier || "" }),
      el("td", { class: `state ${j.state}`, text: j.state, title: j.error || "" }),
      el("td", { text: j.state === "queued" && j.position != null ? String(j.position + 1) : "" }),
      el("td", {}, progress), el("td", { text: eta }), el("td", {}, cancel));
  });
  $("queue-rows").replaceChildren(...rows);
}

async function cancelJob(id) {
  try {
    await del(`/v1/jobs/${id}`);
  } catch (e) {
    showError($("queue-error"), e);
  }
  refreshQueue();
}

export function stopQueue() {
  clearInterval(timer);
}
