// The studio: the generate form, the draft grid (live previews, then the images), and the
// selected asset's panel: promote, edit (mask brush, inpaint, erase, outpaint by aspect or by
// dragging the frame's edges), upscale, and the versions those jobs made, each with its
// progress while queued and running.

import {
  assetImageUrl, del, el, fmtSeconds, getJson, resultImages, showAsset, showError, submitJob, upload, watchJob,
} from "./api.js";
import { MaskEditor } from "./editor.js";
import { FrameDrag } from "./frame.js";
import { openQc } from "./qc.js";

const $ = (id) => document.getElementById(id);

/** Every draft tile of this page, in grid order: {jobId, seed, label, node, assetId, state}. */
const drafts = [];
/** The asset the work panel acts on: {assetId, label}. */
let selected = null;
let editor = null;
let frame = null;
let tiers = [];
let presets = [];
let loras = [];

/** Named points in time (performance marks) the browser test reads to measure latency. */
function markOnce(name) {
  if (performance.getEntriesByName(name, "mark").length === 0) performance.mark(name);
}

export async function initStudio() {
  const form = $("generate-form");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  form.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generate();
    }
  });
  form.aspect.addEventListener("change", () => applyAspect(form));
  $("promote-strength").addEventListener("input", (e) => {
    $("promote-strength-value").value = Number(e.target.value).toFixed(2);
  });
  $("promote").addEventListener("click", () => promote());
  $("upscale").addEventListener("click", () =>
    runOnSelected("upscale", (id) => ({ kind: "upscale", image: { asset: id }, to: $("upscale-to").value })),
  );
  $("inpaint").addEventListener("click", () => inpaint("inpaint"));
  $("erase").addEventListener("click", () => inpaint("erase"));
  for (const b of document.querySelectorAll("button.outpaint")) {
    b.addEventListener("click", () =>
      runOnSelected(`outpaint ${b.dataset.to}`, (id) => ({
        kind: "inpaint", mode: "outpaint", tier: $("edit-tier").value, image: { asset: id },
        extend: { to: b.dataset.to }, prompt: $("edit-prompt").value || form.prompt.value,
      })),
    );
  }
  $("outpaint-frame").addEventListener("click", () =>
    runOnSelected("outpaint frame", (id) => ({
      kind: "inpaint", mode: "outpaint", tier: $("edit-tier").value, image: { asset: id },
      extend: { ...frame.extend }, prompt: $("edit-prompt").value || form.prompt.value,
    })),
  );
  $("frame-reset").addEventListener("click", () => frame?.reset());
  $("open-qc").addEventListener("click", () => selected && openQc(selected.assetId));
  $("brush-erase").addEventListener("click", () => toggleRubOut());
  $("mask-invert").addEventListener("click", () => editor?.invert());
  $("mask-clear").addEventListener("click", () => editor?.clear());
  for (const [id, prop] of [["brush-size", "size"], ["brush-hardness", "hardness"]]) {
    $(id).addEventListener("input", (e) => editor && (editor[prop] = Number(e.target.value)));
  }
  await loadTiers(form);
}

export function toggleRubOut() {
  if (!editor) return;
  editor.rubOut = !editor.rubOut;
  $("brush-erase").setAttribute("aria-pressed", String(editor.rubOut));
}

async function loadTiers(form) {
  try {
    tiers = (await getJson("/v1/tiers")).tiers;
  } catch (e) {
    showError($("generate-error"), e);
    return;
  }
  const diffusion = tiers.filter((t) => String(t.kind).toLowerCase() !== "upscale");
  const fill = (select, preferred) => {
    select.replaceChildren(
      ...diffusion.map((t) => el("option", { value: t.name, text: `${t.name} (${t.width}×${t.height}, ${t.lane})` })),
    );
    if (diffusion.some((t) => t.name === preferred)) select.value = preferred;
  };
  fill(form.tier, "draft");
  fill($("edit-tier"), "final");
  const libraryTier = document.querySelector("#library-filter select[name=tier]");
  for (const t of tiers) libraryTier.append(el("option", { value: t.name, text: t.name }));
  try {
    presets = (await getJson("/v1/presets")).presets;
  } catch (e) {
    showError($("generate-error"), e);
    return;
  }
  for (const p of presets) {
    form.preset.append(el("option", { value: p.name, text: p.description ? `${p.name} — ${p.description}` : p.name }));
  }
  try {
    loras = (await getJson("/v1/loras")).loras;
  } catch (e) {
    // The form works without the LoRA list.
    showError($("generate-error"), e);
  }
  for (const l of loras) {
    const about = [l.info.family, ...(l.info.trigger_words ?? []).slice(0, 3)].filter(Boolean).join(", ");
    form.lora.append(el("option", { value: l.name, text: about ? `${l.name} (${about})` : l.name }));
  }
  // Picking a preset picks its tier too (the tier stays changeable: what is set wins).
  form.preset.addEventListener("change", () => {
    const p = presets.find((x) => x.name === form.preset.value);
    if (p?.tier && diffusion.some((t) => t.name === p.tier)) form.tier.value = p.tier;
  });
}

/** Width and height for the picked aspect at the tier's pixel count (multiples of 8). */
function applyAspect(form) {
  const tier = tiers.find((t) => t.name === form.tier.value);
  if (!form.aspect.value || !tier) return;
  const [a, b] = form.aspect.value.split(":").map(Number);
  const area = tier.width * tier.height;
  const h = Math.sqrt((area * b) / a);
  form.width.value = Math.max(8, Math.round((h * a) / b / 8) * 8);
  form.height.value = Math.max(8, Math.round(h / 8) * 8);
}

/** The spec fields the form sets (blank fields are left to the tier). */
function formSpec(form) {
  const spec = { kind: "generate", tier: form.tier.value, prompt: form.prompt.value };
  if (form.negative.value) spec.negative = form.negative.value;
  if (form.preset.value) spec.preset = form.preset.value;
  if (form.lora.value) spec.loras = [`${form.lora.value}:${Number(form.lora_weight.value) || 0}`];
  for (const f of ["width", "height"]) {
    if (form[f].value !== "") spec[f] = Number(form[f].value);
  }
  return spec;
}

export async function generate() {
  const form = $("generate-form");
  showError($("generate-error"), null);
  performance.clearMarks();
  performance.mark("kiln:generate-click");
  const count = Math.max(1, Math.min(32, Number(form.count.value) || 1));
  // One job per draft, seeds in a row: each tile streams its own previews and can be cancelled.
  // A blank seed is random, unless the preset fixes one.
  const fixed = presets.find((p) => p.name === form.preset.value)?.seed?.fixed;
  const seed0 =
    form.seed.value !== "" ? Number(form.seed.value) : (fixed ?? Math.floor(Math.random() * 2 ** 31));
  const base = formSpec(form);
  for (let i = 0; i < count; i++) {
    const seed = seed0 + i;
    let job;
    try {
      job = await submitJob({ ...base, seed });
    } catch (e) {
      // The server's own words (bad size, budget, quota) under the form.
      showError($("generate-error"), e);
      return;
    }
    addDraftTile(job, seed, base.tier);
  }
}

function addDraftTile(job, seed, tier) {
  $("drafts-empty").hidden = true;
  const img = el("img", { alt: `draft seed ${seed}`, hidden: true });
  const status = el("span", { class: "status", text: positionText(job) });
  const cancel = el("button", { class: "cancel", title: "Cancel this draft", text: "×" });
  const bar = el("progress", { max: 1, value: 0 });
  const node = el("figure", { class: "tile queued", "data-job": job.id, "data-seed": seed, tabindex: 0 },
    el("div", { class: "frame" }, img, bar), el("figcaption", {}, el("span", { text: `seed ${seed}` }), status, cancel));
  const tile = { jobId: job.id, seed, label: `${tier} · seed ${seed}`, node, assetId: null, state: "queued" };
  drafts.push(tile);
  $("draft-grid").append(node);
  node.addEventListener("click", () => tile.assetId && select(tile.assetId, tile.label, tile));
  cancel.addEventListener("click", async (e) => {
    e.stopPropagation();
    try {
      await del(`/v1/jobs/${job.id}`);
    } catch (err) {
      status.textContent = err.message;
    }
  });
  watchJob(job.id, async (ev) => {
    switch (ev.event) {
      case "queued": status.textContent = positionText({ position: ev.position }); break;
      case "started": node.className = "tile running"; status.textContent = "starting"; break;
      case "step": bar.value = ev.step / ev.steps; status.textContent = `step ${ev.step}/${ev.steps}`; break;
      case "preview":
        markOnce("kiln:first-preview-event");
        if (tile.state === "done") break;
        img.src = `data:image/png;base64,${ev.png_base64}`;
        img.hidden = false;
        node.classList.add("previewing");
        node.dataset.previewed = "1";
        await img.decode().catch(() => {});
        markOnce("kiln:first-preview-shown");
        break;
      case "done": {
        markOnce("kiln:first-draft-event");
        const out = resultImages(ev.result)[0];
        tile.state = "done";
        tile.assetId = out?.asset_id ?? null;
        bar.hidden = true;
        cancel.hidden = true;
        const seconds = ev.result?.device_seconds;
        status.textContent = fmtSeconds(seconds);
        node.className = "tile done";
        node.dataset.asset = tile.assetId;
        if (tile.assetId) {
          await showAsset(img, tile.assetId);
          img.hidden = false;
          markOnce("kiln:first-draft-shown");
          if (!selected) select(tile.assetId, tile.label, tile);
        }
        break;
      }
      case "failed": tile.state = "failed"; node.className = "tile failed"; status.textContent = ev.error; cancel.hidden = true; bar.hidden = true; break;
      case "cancelled": tile.state = "cancelled"; node.className = "tile cancelled"; status.textContent = "cancelled"; cancel.hidden = true; bar.hidden = true; break;
      default: break;
    }
  }, job);
}

function positionText(job) {
  return job.position == null ? "queued" : job.position === 0 ? "next" : `queued #${job.position + 1}`;
}

/** Makes asset `id` the one the work panel acts on (the mask editor shows it). */
export async function select(assetId, label, tile = null) {
  selected = { assetId, label };
  for (const t of drafts) t.node.classList.toggle("selected", t === tile);
  $("selected-label").textContent = `asset ${assetId} · ${label}`;
  $("work-actions").hidden = false;
  showError($("work-error"), null);
  const host = $("editor-host");
  editor?.destroy();
  editor = new MaskEditor(host);
  editor.size = Number($("brush-size").value);
  editor.hardness = Number($("brush-hardness").value);
  $("brush-erase").setAttribute("aria-pressed", "false");
  await editor.load(await assetImageUrl(assetId));
  frame = new FrameDrag(editor.wrap, editor.canvas.width, (e) => {
    const parts = Object.entries(e).filter(([, v]) => v > 0).map(([k, v]) => `${k} +${v}`);
    $("frame-extend").value = parts.length ? `${parts.join(", ")} px` : "+0 px";
  });
  $("frame-extend").value = "+0 px";
  // Picked from the versions further down: bring the image back into view to work on it.
  $("work").scrollTop = 0;
  host.dataset.asset = assetId;
}

/** Moves the selection to the next (+1) or previous (-1) finished draft. */
export function step(delta) {
  const done = drafts.filter((t) => t.assetId);
  if (done.length === 0) return;
  const at = done.findIndex((t) => t.assetId === selected?.assetId);
  const next = done[(at + delta + done.length) % done.length];
  next.node.focus();
  select(next.assetId, next.label, next);
}

export function promote() {
  const upscale = $("promote-upscale").value;
  return runOnSelected(upscale ? `promote + upscale ${upscale}` : "promote", (id) => {
    const spec = { kind: "promote", draft: { asset: id }, mode: $("promote-mode").value, strength: Number($("promote-strength").value) };
    if (upscale) spec.upscale = upscale;
    return spec;
  });
}

async function inpaint(mode) {
  if (!selected || !editor) return;
  showError($("work-error"), null);
  let mask;
  try {
    // The mask goes up as an upload, then the job names it by its sha256.
    mask = await upload(await editor.maskPng());
  } catch (e) {
    showError($("work-error"), e);
    return;
  }
  const prompt = $("edit-prompt").value || $("generate-form").prompt.value;
  return runOnSelected(mode, (id) => ({
    kind: "inpaint", mode, tier: $("edit-tier").value, image: { asset: id }, mask: { upload: mask }, prompt,
  }));
}

/** Queues a job made from the selected asset and adds a version card that follows it. */
async function runOnSelected(label, makeSpec) {
  if (!selected) return;
  showError($("work-error"), null);
  const source = selected;
  let job;
  try {
    job = await submitJob(makeSpec(source.assetId));
  } catch (e) {
    showError($("work-error"), e);
    return;
  }
  addVersion(job, `${label} of ${source.assetId}`);
}

function addVersion(job, label) {
  const status = el("span", { class: "status", text: positionText(job) });
  const bar = el("progress", { max: 1, value: 0 });
  const thumbs = el("div", { class: "thumbs" });
  const node = el("div", { class: "version queued", "data-job": job.id },
    el("div", {}, el("b", { text: `#${job.id} ${label}` }), " ", status), bar, thumbs);
  $("versions").prepend(node);
  watchJob(job.id, async (ev) => {
    switch (ev.event) {
      case "queued": status.textContent = positionText({ position: ev.position }); break;
      case "started": node.className = "version running"; status.textContent = "running"; break;
      case "stage": status.textContent = ev.stage; break;
      case "step": bar.value = ev.step / ev.steps; status.textContent = `step ${ev.step}/${ev.steps}`; break;
      case "tiles": bar.value = ev.done / ev.total; status.textContent = `tiles ${ev.done}/${ev.total}`; break;
      case "yielded": status.textContent = "paused for a draft"; break;
      case "done": {
        node.className = "version done";
        bar.hidden = true;
        const d = ev.result?.detail || {};
        // kiln's closeness of a final to its draft (SSIM at the draft's size, PSNR).
        const closeness = d.ssim != null ? ` · SSIM ${d.ssim.toFixed(3)} · PSNR ${d.psnr.toFixed(1)} dB` : "";
        status.textContent = `done in ${fmtSeconds(ev.result?.device_seconds)}${closeness}`;
        if (d.ssim != null) node.dataset.ssim = d.ssim;
        for (const out of resultImages(ev.result)) {
          if (!out.asset_id) continue;
          const img = el("img", { alt: `${out.role} ${out.asset_id}`, title: `asset ${out.asset_id} (${out.role}): click to work on it`, "data-asset": out.asset_id });
          img.addEventListener("click", () => select(out.asset_id, `${out.role} (job ${job.id})`));
          thumbs.append(el("figure", {}, img, el("figcaption", { text: `${out.role} · asset ${out.asset_id}` })));
          showAsset(img, out.asset_id).catch((e) => showError($("work-error"), e));
        }
        break;
      }
      case "failed": node.className = "version failed"; bar.hidden = true; status.textContent = ev.error; break;
      case "cancelled": node.className = "version cancelled"; bar.hidden = true; status.textContent = "cancelled"; break;
      default: break;
    }
  }, job);
}

export function selectedAsset() {
  return selected?.assetId ?? null;
}
