// The page's entry: tabs, keyboard shortcuts, the key (asked for when the API answers 401)
// and the owner name that tells my jobs from everyone's.

import { askForKey, me, onConnection, showError } from "./api.js";
import { refreshCosts } from "./costs.js";
import { initLibrary, refreshLibrary } from "./library.js";
import { closeQc, initQc, openQc, qcOpen, toggleFlicker } from "./qc.js";
import { initQueue, refreshQueue, setOwner } from "./queue.js";
import { generate, initStudio, promote, selectedAsset, step, toggleRubOut } from "./studio.js";

const $ = (id) => document.getElementById(id);
const TABS = ["studio", "queue", "library", "costs"];

function showTab(name) {
  for (const t of TABS) {
    $(`tab-${t}`).hidden = t !== name;
    document.querySelector(`[data-tab=${t}]`).setAttribute("aria-selected", String(t === name));
  }
  if (name === "queue") refreshQueue();
  if (name === "library") refreshLibrary();
  if (name === "costs") refreshCosts();
}

/** Connection state from the job streams: a banner while they are reconnecting. */
let connected = true;
function setConnection(ok) {
  $("connection").hidden = ok;
  // Back after a drop: re-read the queue at once instead of at the next tick.
  if (ok && !connected) refreshQueue();
  connected = ok;
}

async function loadOwner() {
  try {
    const who = await me();
    $("owner").textContent = who.owner;
    setOwner(who.owner);
    refreshQueue();
  } catch (e) {
    showError($("generate-error"), e);
  }
}

function typing(e) {
  const t = e.target;
  return t instanceof HTMLInputElement || t instanceof HTMLTextAreaElement || t instanceof HTMLSelectElement;
}

function onKey(e) {
  if (e.key === "Escape" && qcOpen()) {
    closeQc();
    return;
  }
  if (typing(e) || e.ctrlKey || e.metaKey || e.altKey || document.querySelector("dialog[open]")) return;
  const studio = !$("tab-studio").hidden;
  const actions = {
    g: () => studio && generate(),
    p: () => studio && promote(),
    ArrowRight: () => studio && step(1),
    j: () => studio && step(1),
    ArrowLeft: () => studio && step(-1),
    k: () => studio && step(-1),
    e: () => toggleRubOut(),
    q: () => selectedAsset() && openQc(selectedAsset()),
    f: () => qcOpen() && toggleFlicker(),
    "?": () => $("help-dialog").showModal(),
    1: () => showTab("studio"),
    2: () => showTab("queue"),
    3: () => showTab("library"),
    4: () => showTab("costs"),
  };
  const action = actions[e.key];
  if (action) {
    e.preventDefault();
    action();
  }
}

async function main() {
  for (const b of document.querySelectorAll("[data-tab]")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("change-key").addEventListener("click", () => askForKey("Paste another API key."));
  $("help-button").addEventListener("click", () => $("help-dialog").showModal());
  document.addEventListener("keydown", onKey);
  document.addEventListener("kiln:key-changed", loadOwner);
  onConnection(setConnection);
  initQc();
  initQueue();
  initLibrary();
  await loadOwner();
  await initStudio();
}

main();
