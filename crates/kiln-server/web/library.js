// The library: the project's assets (filter by kind, tier, date and prompt text), and one
// asset's lineage tree (draft → final → upscaled / inpainted), full parameters, model hashes,
// device seconds and credits, with download, replay and the QC view.

import {
  assetImageUrl, el, fmtCredits, fmtSeconds, getJson, showAsset, showError, submitJob,
} from "./api.js";
import { openQc } from "./qc.js";

const $ = (id) => document.getElementById(id);
const TREE_LIMIT = 60;

export function initLibrary() {
  $("library-filter").addEventListener("submit", (e) => {
    e.preventDefault();
    refreshLibrary();
  });
}

export async function refreshLibrary() {
  const form = $("library-filter");
  const params = new URLSearchParams({ limit: "500" });
  if (form.kind.value) params.set("kind", form.kind.value);
  if (form.tier.value) params.set("tier", form.tier.value);
  let assets;
  try {
    assets = (await getJson(`/v1/assets?${params}`)).assets;
    showError($("library-error"), null);
  } catch (e) {
    showError($("library-error"), e);
    return;
  }
  // Prompt text and date are filtered here: the API filters by kind and tier.
  const text = form.text.value.trim().toLowerCase();
  const since = form.since.value ? Date.parse(`${form.since.value}T00:00:00Z`) / 1000 : null;
  const shown = assets.filter(
    (a) => (!text || (a.prompt || "").toLowerCase().includes(text)) && (since == null || a.created_at >= since),
  );
  $("library-grid").replaceChildren(...shown.map((a) => {
    const img = el("img", { alt: `asset ${a.id}`, loading: "lazy" });
    showAsset(img, a.id).catch(() => {});
    return el("figure", { class: "tile done", "data-asset": a.id, tabindex: 0, onclick: () => showDetail(a.id) },
      el("div", { class: "frame" }, img),
      el("figcaption", {}, el("span", { text: `#${a.id} ${a.kind}` }), el("span", { class: "status", text: a.tier || "" })));
  }));
  if (shown.length === 0) $("library-grid").append(el("p", { class: "hint", text: "No assets match." }));
}

/** The tree under `root` (children fetched level by level, at most TREE_LIMIT nodes). */
async function subtree(root, budget) {
  const node = { asset: root, children: [] };
  if (budget.left-- <= 0) return node;
  const { children } = await getJson(`/v1/assets/${root.id}/lineage`);
  for (const c of children) node.children.push(await subtree(c, budget));
  return node;
}

function renderTree(node, currentId) {
  const a = node.asset;
  const label = el("button", {
    class: a.id === currentId ? "link current" : "link", "data-asset": a.id,
    text: `#${a.id} ${a.kind}${a.tier ? ` (${a.tier})` : ""} ${a.width}×${a.height}`, onclick: () => showDetail(a.id),
  });
  return el("li", {}, label, node.children.length ? el("ul", {}, node.children.map((c) => renderTree(c, currentId))) : "");
}

function table(rows) {
  return el("table", { class: "params" },
    rows.filter(([, v]) => v != null && v !== "").map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", {}, v))));
}

export async function showDetail(id) {
  const box = $("asset-detail");
  const error = el("p", { class: "error", role: "alert" });
  let asset;
  let lineage;
  try {
    [asset, lineage] = await Promise.all([getJson(`/v1/assets/${id}`), getJson(`/v1/assets/${id}/lineage`)]);
  } catch (e) {
    box.replaceChildren(error);
    showError(error, e);
    return;
  }
  const root = lineage.lineage[lineage.lineage.length - 1];
  const tree = await subtree(root, { left: TREE_LIMIT });
  const img = el("img", { alt: `asset ${id}`, class: "detail-image" });
  showAsset(img, id).catch((e) => showError(error, e));
  const download = el("a", { class: "button", text: "Download", download: asset.path.split("/").pop() });
  assetImageUrl(id).then((u) => (download.href = u)).catch(() => {});
  const replay = el("button", {
    text: "Replay",
    title: "Render it again from its record (same bytes expected)",
    onclick: async () => {
      try {
        const job = await submitJob({ kind: "replay", asset: { asset: id } });
        replay.textContent = `Replay queued (#${job.id})`;
      } catch (e) {
        showError(error, e);
      }
    },
  });
  const r = asset.record || {};
  const job = asset.job || {};
  box.replaceChildren(
    el("h2", { text: `Asset #${asset.id} · ${asset.kind}` }),
    img,
    el("div", { class: "row buttons" }, download, replay, el("button", { text: "QC at 100%", onclick: () => openQc(id) })),
    error,
    el("h3", { text: "Lineage" }),
    el("ul", { class: "lineage" }, renderTree(tree, asset.id)),
    el("h3", { text: "Cost" }),
    table([
      ["credits", el("span", { class: "credits", text: fmtCredits(asset.credits) })],
      ["device seconds (job)", fmtSeconds(job.device_seconds)],
      ["job", job.id ? `#${job.id} ${job.kind}, ${job.images} image(s), ${fmtCredits(job.credits)} credits` : null],
      ["device", job.device ? `${job.device} ${job.dtype}` : null],
    ]),
    el("h3", { text: "Parameters" }),
    table([
      ["prompt", asset.prompt ?? r.prompt],
      ["negative", r.negative_prompt],
      ["tier", asset.tier],
      ["size", `${asset.width}×${asset.height}`],
      ["seed", asset.seed != null ? String(asset.seed) : null],
      ["steps", r.steps != null ? String(r.steps) : null],
      ["guidance", r.guidance != null ? String(r.guidance) : null],
      ["scheduler", r.scheduler],
      ["strength", r.strength != null ? String(r.strength) : null],
      ["mode", r.mode],
      ["created", new Date(asset.created_at * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC"],
      ["file", asset.path],
      ["sha256", el("code", { text: asset.sha256 })],
    ]),
    asset.params ? el("pre", { class: "json", text: JSON.stringify(asset.params, null, 1) }) : "",
    el("h3", { text: "Model hashes" }),
    table((asset.model_hashes || []).map((w) => [w.component, el("code", { title: w.file, text: w.sha256.slice(0, 16) })])),
  );
  box.dataset.asset = asset.id;
}
