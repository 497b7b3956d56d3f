// The QC view: an asset at 100% (one image pixel on one device pixel, whatever the screen's
// devicePixelRatio), zoom steps, drag to pan, and a before/after compare against the asset's
// parent (a slider that wipes between them, or flicker).

import { assetImageUrl, getJson, showError } from "./api.js";

const $ = (id) => document.getElementById(id);
let zoom = 1;
let flickerTimer = null;
let current = null;

export function qcOpen() {
  return !$("qc").hidden;
}

export async function openQc(assetId) {
  const view = $("qc");
  view.hidden = false;
  current = assetId;
  const note = $("qc-note");
  note.textContent = "";
  const after = $("qc-after");
  const before = $("qc-before");
  before.hidden = true;
  before.removeAttribute("src");
  try {
    const asset = await getJson(`/v1/assets/${assetId}`);
    $("qc-title").textContent = `asset ${asset.id} · ${asset.kind} · ${asset.width}×${asset.height}`;
    after.src = await assetImageUrl(asset.id);
    await after.decode();
    if (asset.parent_id) {
      before.src = await assetImageUrl(asset.parent_id);
      await before.decode();
      view.dataset.parent = asset.parent_id;
      if (before.naturalWidth !== after.naturalWidth || before.naturalHeight !== after.naturalHeight) {
        note.textContent = `parent ${asset.parent_id} is ${before.naturalWidth}×${before.naturalHeight}: stretched to compare`;
      }
    } else {
      delete view.dataset.parent;
      note.textContent = "no parent to compare with";
    }
  } catch (e) {
    showError(note, e);
  }
  view.dataset.asset = assetId;
  setZoom(1);
  setMode($("qc-mode").value);
}

export function closeQc() {
  $("qc").hidden = true;
  stopFlicker();
  current = null;
}

/** Zoom `z` of image pixels per device pixel; sizes are in CSS pixels, hence the ratio. */
function setZoom(z) {
  zoom = z;
  const after = $("qc-after");
  const w = (after.naturalWidth * z) / devicePixelRatio;
  const h = (after.naturalHeight * z) / devicePixelRatio;
  const stage = $("qc-stage");
  stage.style.width = `${w}px`;
  stage.style.height = `${h}px`;
  stage.classList.toggle("pixelated", z > 1);
  for (const b of document.querySelectorAll("#qc [data-zoom]")) {
    b.setAttribute("aria-pressed", String(Number(b.dataset.zoom) === z));
  }
  $("qc").dataset.zoom = z;
}

function stopFlicker() {
  clearInterval(flickerTimer);
  flickerTimer = null;
}

function setMode(mode) {
  stopFlicker();
  const before = $("qc-before");
  const slider = $("qc-slider");
  const hasParent = Boolean($("qc").dataset.parent);
  slider.hidden = mode !== "slider" || !hasParent;
  before.hidden = mode === "off" || !hasParent;
  before.style.clipPath = mode === "slider" ? `inset(0 ${100 - slider.value}% 0 0)` : "none";
  // A line where the parent (left) meets the asset (right).
  const divider = $("qc-divider");
  divider.hidden = slider.hidden;
  divider.style.left = `${slider.value}%`;
  before.style.visibility = "visible";
  if (mode === "flicker" && hasParent) {
    flickerTimer = setInterval(() => {
      before.style.visibility = before.style.visibility === "hidden" ? "visible" : "hidden";
    }, 600);
  }
}

export function toggleFlicker() {
  const mode = $("qc-mode");
  mode.value = mode.value === "flicker" ? "off" : "flicker";
  setMode(mode.value);
}

export function initQc() {
  $("qc-close").addEventListener("click", closeQc);
  for (const b of document.querySelectorAll("#qc [data-zoom]")) {
    b.addEventListener("click", () => setZoom(Number(b.dataset.zoom)));
  }
  $("qc-mode").addEventListener("change", (e) => setMode(e.target.value));
  $("qc-slider").addEventListener("input", () => setMode("slider"));
  // Drag to pan: the viewport scrolls.
  const vp = $("qc-viewport");
  let drag = null;
  vp.addEventListener("pointerdown", (e) => {
    drag = { x: e.clientX, y: e.clientY, left: vp.scrollLeft, top: vp.scrollTop };
    vp.setPointerCapture(e.pointerId);
  });
  vp.addEventListener("pointermove", (e) => {
    if (!drag) return;
    vp.scrollLeft = drag.left - (e.clientX - drag.x);
    vp.scrollTop = drag.top - (e.clientY - drag.y);
  });
  vp.addEventListener("pointerup", () => (drag = null));
  // A changed devicePixelRatio (browser zoom, another screen) keeps 100% at one device pixel.
  window.addEventListener("resize", () => current && setZoom(zoom));
}
