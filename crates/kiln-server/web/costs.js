// Costs, from GET /v1/report: burn per day (an SVG bar chart), the draft:final ratio against
// the project's policy, budget used and left, and cost per delivered asset.

import { el, fmtCredits, fmtSeconds, getJson, showError } from "./api.js";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text != null) n.textContent = text;
  return n;
}

/** Bars of credits per day (the last 30 days that had jobs), labelled with date and value. */
function burnChart(days) {
  const shown = days.slice(-30);
  const width = 720;
  const height = 220;
  const pad = { left: 56, bottom: 36, top: 12 };
  const max = Math.max(...shown.map((d) => d.credits), 1e-9);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": "credits burned per day" });
  const plotH = height - pad.bottom - pad.top;
  // Bars no wider than a few days' worth, so two days do not look like a wall.
  const slot = Math.min((width - pad.left) / Math.max(shown.length, 1), 60);
  chart.append(svg("line", { x1: pad.left, y1: pad.top + plotH, x2: width, y2: pad.top + plotH, class: "axis" }));
  chart.append(svg("text", { x: pad.left - 6, y: pad.top + 10, "text-anchor": "end", class: "tick" }, fmtCredits(max)));
  chart.append(svg("text", { x: pad.left - 6, y: pad.top + plotH, "text-anchor": "end", class: "tick" }, "0"));
  shown.forEach((d, i) => {
    const h = (d.credits / max) * plotH;
    const x = pad.left + i * slot + slot * 0.15;
    const bar = svg("rect", { x, y: pad.top + plotH - h, width: slot * 0.7, height: Math.max(h, 1), class: "bar", "data-date": d.date });
    bar.append(svg("title", {}, `${d.date}: ${fmtCredits(d.credits)} credits, ${d.images} images, ${fmtSeconds(d.device_seconds)}`));
    chart.append(bar);
    chart.append(svg("text", { x: x + slot * 0.35, y: height - 18, "text-anchor": "middle", class: "tick" }, d.date.slice(5)));
  });
  return chart;
}

export async function refreshCosts() {
  const box = document.getElementById("costs");
  const error = el("p", { class: "error", role: "alert" });
  let report;
  try {
    report = (await getJson("/v1/report")).report;
  } catch (e) {
    box.replaceChildren(el("h2", { text: "Costs" }), error);
    showError(error, e);
    return;
  }
  const ratio = report.drafts_per_final;
  const used = report.total_credits;
  const budget = report.budget_limit;
  const stat = (label, value, cls = "") => el("div", { class: `stat ${cls}` }, el("span", { text: label }), el("b", { text: value }));
  box.replaceChildren(
    el("h2", { text: "Costs" }),
    el("div", { class: "stats" },
      stat("credits used", fmtCredits(used), "used"),
      stat("budget left", budget == null ? "no budget set" : `${fmtCredits(report.budget_left)} of ${fmtCredits(budget)}`, "left"),
      stat("drafts : finals", `${report.drafts} : ${report.finals}`, "ratio"),
      stat("drafts per final", ratio == null ? "no final yet" : `${ratio.toFixed(1)} (policy ${report.policy_drafts_per_final})`),
      stat("verdict", report.policy_verdict),
      stat("cost per delivered asset", report.cost_per_delivered == null ? "–" : fmtCredits(report.cost_per_delivered), "per-asset"),
      stat("device time", fmtSeconds(report.total_device_seconds)),
      stat("jobs", String(report.jobs))),
    budget ? el("meter", { min: 0, max: budget, value: used, high: budget * 0.8, title: "budget used" }) : "",
    el("h3", { text: "Burn per day (credits)" }),
    report.days.length ? burnChart(report.days) : el("p", { class: "hint", text: "No jobs yet." }),
    el("h3", { text: "By tier" }),
    el("table", { class: "params" },
      el("tr", {}, ["tier", "jobs", "images", "device time", "credits"].map((h) => el("th", { text: h }))),
      report.tiers.map((t) => el("tr", {}, el("td", { text: t.tier }), el("td", { text: String(t.jobs) }),
        el("td", { text: String(t.images) }), el("td", { text: fmtSeconds(t.device_seconds) }), el("td", { text: fmtCredits(t.credits) })))),
  );
}
