// vlctl's dashboard: the jobs page and a job's page, drawn from the JSON API (controller/dashboard/app.py).
// Every string from a job goes into the page through textContent (el()), never as HTML; strings handed to
// plotly (which reads a little HTML in labels) go through plotlyText() first.
"use strict";

const PHASES = ["pending", "launching", "running", "restarting", "succeeded", "failed", "cancelled"];
let refreshMs = 1000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function plotlyText(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (!r.ok) {
    let why = r.status + " " + r.statusText;
    try { why = (await r.json()).error || why; } catch (e) { /* not JSON */ }
    throw new Error(why);
  }
  return r.json();
}

// plotly.js (4.8 MB) loads async: the tables are drawn as soon as the data arrives, the charts once it has run.
const plotlyReady = new Promise((resolve) => {
  if (window.Plotly) { resolve(); return; }
  const tag = document.getElementById("plotly");
  tag.addEventListener("load", () => resolve());
  tag.addEventListener("error", () => resolve());  // the charts then fail and say so in the live line
});

function fmtNum(v, digits) { return v === null || v === undefined ? "" : Number(v).toFixed(digits); }
function fmtPct(v) { return v === null || v === undefined ? "" : (100 * v).toFixed(1) + "%"; }
function fmtCount(v) {
  if (v === null || v === undefined) return "";
  if (v >= 1e6) return (v / 1e6).toFixed(2) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
  return v.toFixed(0);
}
function fmtSeconds(s) {
  if (s === null || s === undefined) return "";
  if (s < 90) return s.toFixed(1) + " s";
  if (s < 5400) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function fmtTime(iso) { return iso ? iso.replace("T", " ").slice(0, 19) : ""; }
function phaseBadge(p) { return el("span", { class: "phase " + (p || ""), text: p || "(not admitted)" }); }

function table(headers, rows, rowClass) {
  const t = el("table");
  const head = el("tr");
  for (const h of headers) head.append(el("th", { class: h.num ? "num" : "", text: h.label }));
  t.append(el("thead", {}, head));
  const body = el("tbody");
  for (const r of rows) {
    const tr = el("tr", { class: rowClass ? rowClass(r) : "" });
    for (const h of headers) {
      const v = h.value(r);
      tr.append(el("td", { class: (h.num ? "num " : "") + (h.wrap ? "wrap" : "") }, v instanceof Node ? v : String(v ?? "")));
    }
    body.append(tr);
  }
  t.append(body);
  return t;
}

// Each refresh starts a period after the previous one ended: two never overlap (a slow answer would otherwise
// let a second fetch of the loss curve's new lines append the same points twice).
async function repeat(refresh) {
  await refresh();
  setTimeout(() => repeat(refresh), refreshMs);
}

function setLive(ok, why) {
  const live = document.getElementById("live");
  live.textContent = ok ? "updated " + new Date().toLocaleTimeString() : "not updated: " + why;
  live.className = ok ? "" : "error";
}

// ------------------------------------------------------------------------------------------------ jobs page

async function jobsPage(main) {
  const params = new URLSearchParams(location.search);
  const filter = el("select", { id: "phase-filter" }, el("option", { value: "", text: "every phase" }),
    ...PHASES.map((p) => el("option", { value: p, text: p })));
  filter.value = params.get("phase") || "";
  filter.addEventListener("change", () => {
    const q = filter.value ? "?phase=" + encodeURIComponent(filter.value) : "";
    history.replaceState(null, "", "/" + q);
    refresh();
  });
  const holder = el("div", { id: "jobs" });
  main.replaceChildren(el("h1", { text: "Jobs" }), el("p", {}, "Phase: ", filter), holder);
  const headers = [
    { label: "job", value: (j) => el("a", { href: "/jobs/" + encodeURIComponent(j.name), text: j.name }) },
    { label: "phase", value: (j) => phaseBadge(j.phase) },
    { label: "step", num: true, value: (j) => j.step === null ? "" : j.step + (j.total_steps ? " / " + j.total_steps : "") },
    { label: "progress", num: true, value: (j) => fmtPct(j.progress) },
    { label: "ETA", num: true, value: (j) => fmtSeconds(j.eta_seconds) },
    { label: "loss", num: true, value: (j) => fmtNum(j.loss, 4) },
    { label: "tokens/s", num: true, value: (j) => fmtCount(j.tokens_per_second) },
    { label: "restarts", num: true, value: (j) => j.restarts },
    { label: "checkpoint", num: true, value: (j) => j.last_checkpoint_step ?? "" },
    { label: "ETTR", num: true, value: (j) => fmtPct(j.ettr) },
    { label: "updated", value: (j) => fmtTime(j.updated) },
  ];
  async function refresh() {
    try {
      const q = filter.value ? "?phase=" + encodeURIComponent(filter.value) : "";
      const jobs = await getJSON("/api/jobs" + q);
      holder.replaceChildren(jobs.length ? table(headers, jobs.slice().reverse()) : el("p", { class: "muted", text: "no jobs" }));
      setLive(true);
    } catch (e) { setLive(false, e.message); }
  }
  repeat(refresh);
}

// ------------------------------------------------------------------------------------------------ a job's page

function card(key, id) { return el("div", { class: "card" }, el("div", { class: "k", text: key }), el("div", { class: "v", id })); }

async function jobPage(main, name) {
  document.getElementById("crumb").textContent = " / " + name;
  document.title = name + " - vlctl";
  main.replaceChildren(
    el("h1", {}, el("span", { id: "job-name", text: name }), " ", el("span", { id: "job-phase" })),
    el("p", { id: "job-message", class: "muted" }),
    el("div", { class: "cards" }, card("step", "c-step"), card("loss", "c-loss"), card("tokens/s", "c-tps"),
      card("ETA", "c-eta"), card("ETTR", "c-ettr"), card("restarts", "c-restarts"), card("attempt", "c-attempt"),
      card("resumes from", "c-resume")),
    el("h2", { text: "Loss" }), el("div", { id: "loss-chart", class: "chart" }),
    el("div", { class: "grid2" },
      el("div", {}, el("h2", { text: "Tokens/s" }), el("div", { id: "tps-chart", class: "chart" })),
      el("div", {}, el("h2", { text: "MFU" }), el("div", { id: "mfu-chart", class: "chart" }))),
    el("h2", { text: "Ranks: own-work time per window" }), el("p", { id: "heatmap-note", class: "muted" }),
    el("div", { id: "heatmap", class: "chart" }),
    el("div", { id: "ranks" }),
    el("h2", { text: "Goodput" }), el("div", { id: "goodput", class: "chart" }),
    el("h2", { text: "Attempts" }), el("div", { id: "attempts" }),
    el("h2", { text: "Timeline" }), el("div", { id: "events" }),
    el("h2", { text: "Checkpoints" }), el("div", { id: "checkpoints" }),
  );
  const path = "/api/jobs/" + encodeURIComponent(name);
  const steps = { offset: 0, points: [] };
  let drawn = { steps: -1, attempts: "", heat: "", goodput: "" };

  async function newSteps() { // the loss curve's new lines (a long run arrives in chunks)
    for (;;) {
      const more = await getJSON(path + "/steps?offset=" + steps.offset);
      if (more.reset) steps.points = [];
      steps.points.push(...more.points);
      const done = more.offset === steps.offset || more.points.length === 0;
      steps.offset = more.offset;
      if (done) return;
    }
  }

  async function refresh() {
    try {
      const [job, heat] = await Promise.all([getJSON(path), getJSON(path + "/heatmap"), newSteps()]);
      drawJob(job);
      await plotlyReady;
      const key = JSON.stringify(job.attempts) + job.events.length;
      if (steps.points.length !== drawn.steps || key !== drawn.attempts) {
        drawCurves(steps.points, job.attempts, job.events);
        drawn.steps = steps.points.length;
        drawn.attempts = key;
      }
      const heatKey = JSON.stringify(heat) + JSON.stringify(job.ranks.map((r) => r.straggler));
      if (heatKey !== drawn.heat) { drawHeatmap(heat, job.ranks); drawn.heat = heatKey; }
      const goodKey = JSON.stringify([job.productive_seconds, job.lost_seconds]);
      if (goodKey !== drawn.goodput) { drawGoodput(job); drawn.goodput = goodKey; }
      setLive(true);
    } catch (e) { setLive(false, e.message); }
  }
  repeat(refresh);
}

function drawJob(j) {
  document.getElementById("job-phase").replaceChildren(phaseBadge(j.phase));
  document.getElementById("job-message").textContent = [j.reason, j.message].filter(Boolean).join(": ");
  const set = (id, v) => { document.getElementById(id).textContent = v === "" || v === null || v === undefined ? "-" : v; };
  set("c-step", j.step === null ? "" : j.step + (j.total_steps ? " / " + j.total_steps : ""));
  set("c-loss", fmtNum(j.loss, 4));
  set("c-tps", fmtCount(j.tokens_per_second));
  set("c-eta", fmtSeconds(j.eta_seconds));
  set("c-ettr", fmtPct(j.ettr));
  set("c-restarts", j.restarts);
  set("c-attempt", j.attempt);
  set("c-resume", j.resume_from_step ?? j.last_checkpoint_step ?? "");

  const ranks = document.getElementById("ranks");
  const parts = [];
  if (j.num_ranks > j.ranks.length) {
    parts.push(el("h2", { text: "Nodes (the flagged, furthest behind and slowest first)" }), table([
      { label: "node", value: (n) => n.node },
      { label: "ranks", num: true, value: (n) => n.ranks },
      { label: "steps", num: true, value: (n) => n.first_step === null ? "" : (n.first_step === n.last_step ? n.first_step : n.first_step + "-" + n.last_step) },
      { label: "own s median", num: true, value: (n) => fmtNum(n.own_work_median_s, 3) },
      { label: "own s max", num: true, value: (n) => fmtNum(n.own_work_max_s, 3) },
      { label: "flagged", num: true, value: (n) => n.flagged || "" },
    ], j.nodes_summary, (n) => n.flagged ? "flagged" : ""));
  }
  parts.push(el("h2", { text: j.num_ranks > j.ranks.length ? `Ranks worth a look (${j.ranks.length} of ${j.num_ranks})` : "Ranks" }), table([
    { label: "rank", num: true, value: (r) => r.rank },
    { label: "node", value: (r) => r.node },
    { label: "pid", num: true, value: (r) => r.pid ?? "" },
    { label: "step", num: true, value: (r) => r.step ?? "" },
    { label: "own s", num: true, value: (r) => fmtNum(r.own_work_s, 3) },
    { label: "step s", num: true, value: (r) => fmtNum(r.step_s, 3) },
    { label: "score", num: true, value: (r) => fmtNum(r.straggler_score, 1) },
    { label: "flagged", wrap: true, value: (r) => !r.flagged ? "" : "straggler" + (r.straggler ?
      `: ${r.straggler.cause || "unknown cause"}${r.straggler.phase ? " (" + r.straggler.phase + ")" : ""}, ${fmtNum(r.straggler.slowdown, 2)}x since step ${r.straggler.step}` : "") },
  ], j.ranks, (r) => r.flagged ? "flagged" : ""));
  ranks.replaceChildren(...parts);

  document.getElementById("attempts").replaceChildren(table([
    { label: "attempt", num: true, value: (a) => a.number },
    { label: "started", value: (a) => fmtTime(a.started) },
    { label: "ended", value: (a) => fmtTime(a.ended) },
    { label: "resumed from step", num: true, value: (a) => a.resumed_from_step ?? "" },
    { label: "last step", num: true, value: (a) => a.last_step ?? "" },
    { label: "exit", value: (a) => a.exit_class ?? "" },
    { label: "failure", wrap: true, value: (a) => a.failure_message ?? "" },
  ], j.attempts));
  document.getElementById("events").replaceChildren(table([
    { label: "time", value: (e) => fmtTime(e.time) },
    { label: "attempt", num: true, value: (e) => e.attempt ?? "" },
    { label: "type", value: (e) => e.type },
    { label: "reason", value: (e) => e.reason },
    { label: "message", wrap: true, value: (e) => e.message },
  ], j.events.slice().reverse(), (e) => e.type === "Failure" ? "flagged" : ""));
  document.getElementById("checkpoints").replaceChildren(j.checkpoints.length ? table([
    { label: "step", num: true, value: (c) => c.step },
    { label: "state", value: (c) => c.committed ? (c.verified === false ? "corrupt" : "committed") : "partial" },
    { label: "size", num: true, value: (c) => c.size ?? "" },
    { label: "save", num: true, value: (c) => fmtSeconds(c.save_seconds) },
    { label: "committed at", value: (c) => fmtTime(c.committed_at) },
    { label: "next resume", value: (c) => c.resume_next ? "<- resumes here" : "" },
    { label: "uri", wrap: true, value: (c) => c.uri ?? "" },
  ], j.checkpoints.slice().reverse()) : el("p", { class: "muted", text: "no checkpoints yet" }));
}

const LAYOUT = { margin: { l: 50, r: 20, t: 10, b: 40 }, xaxis: { title: { text: "step" } }, showlegend: false };
const CONFIG = { displaylogo: false, responsive: true };

function drawCurves(points, attempts, events) {
  const x = points.map((p) => p.step);
  // Restarts and rollbacks: a line where each attempt after the first resumed, and where an in-place recovery
  // went back to its snapshot's step.
  const marks = [];
  for (const a of attempts) {
    if (a.number > 1 && a.resumed_from_step !== null) marks.push({ step: a.resumed_from_step, label: "attempt " + a.number });
  }
  for (const e of events) {
    if (e.reason === "RecoveredInPlace" && e.data && Number.isInteger(e.data.step)) marks.push({ step: e.data.step, label: "in place" });
  }
  const shapes = marks.map((m) => ({ type: "line", x0: m.step, x1: m.step, yref: "paper", y0: 0, y1: 1, line: { color: "#c62828", dash: "dot", width: 1 } }));
  const annotations = marks.map((m) => ({ x: m.step, yref: "paper", y: 1, text: plotlyText(m.label), showarrow: false, xanchor: "left", font: { size: 10, color: "#c62828" } }));
  const text = points.map((p) => "attempt " + p.attempt);
  Plotly.react("loss-chart", [{ x, y: points.map((p) => p.loss), text, mode: "lines", line: { width: 1.5 }, hovertemplate: "step %{x}<br>loss %{y:.4f}<br>%{text}<extra></extra>" }],
    { ...LAYOUT, yaxis: { title: { text: "loss" } }, shapes, annotations }, CONFIG);
  Plotly.react("tps-chart", [{ x, y: points.map((p) => p.tokens_per_second), mode: "lines", line: { width: 1 } }],
    { ...LAYOUT, yaxis: { title: { text: "tokens/s" }, rangemode: "tozero" } }, CONFIG);
  const mfu = points.map((p) => p.mfu === null ? null : 100 * p.mfu);
  const mfuChart = document.getElementById("mfu-chart");
  if (mfu.every((v) => v === null)) {
    Plotly.purge(mfuChart);
    mfuChart.replaceChildren(el("p", { class: "muted", text: "no MFU reported (the trainer reports it once it knows the device's peak: mfu.device or mfu.peak_flops)" }));
  } else {
    if (!mfuChart.data) mfuChart.replaceChildren();
    Plotly.react(mfuChart, [{ x, y: mfu, mode: "lines", line: { width: 1 } }], { ...LAYOUT, yaxis: { title: { text: "MFU %" }, rangemode: "tozero" } }, CONFIG);
  }
}

// What a flagged cell's hover says: the cause of the row's flagged rank(s), from their newest report. Each
// line is escaped (plotly reads a little HTML), then joined with plotly's line break.
function flaggedText(h, ranks, label) {
  const why = ranks.filter((r) => r.flagged && r.straggler && (h.by === "rank" ? String(r.rank) === label : r.node === label))
    .map((r) => `rank ${r.rank}: ${r.straggler.cause || "unknown cause"}${r.straggler.phase ? " (" + r.straggler.phase + ")" : ""}, ${fmtNum(r.straggler.slowdown, 2)}x`);
  return why.length ? why.map(plotlyText).join("<br>") : "flagged";
}

function drawHeatmap(h, ranks) {
  const note = document.getElementById("heatmap-note");
  if (!h.rows.length) {
    note.textContent = "no straggler windows yet in attempt " + h.attempt;
    Plotly.purge("heatmap");
    return;
  }
  note.textContent = (h.by === "node" ? `${h.num_ranks} ranks: a row per node (its slowest rank's median), the ${h.rows.length - 1} of ${h.num_rows} nodes worth a look under the median of all` : "a row per rank") +
    `; median own-work seconds per window of attempt ${h.attempt}; x: flagged as a straggler`;
  const y = h.rows.map(plotlyText);
  const heat = { type: "heatmap", x: h.windows, y, z: h.own_work_s, colorscale: "YlOrRd", reversescale: true, colorbar: { title: { text: "own s" } },
    hovertemplate: (h.by === "node" ? "node" : "rank") + " %{y}<br>window from step %{x}<br>own %{z:.3f} s<extra></extra>" };
  const flagged = { type: "scatter", mode: "markers", x: h.flagged.map((c) => h.windows[c.window]), y: h.flagged.map((c) => y[c.row]),
    text: h.flagged.map((c) => flaggedText(h, ranks, h.rows[c.row])),
    marker: { symbol: "x", size: 10, color: "#0d47a1" }, hovertemplate: "flagged: %{text}<extra></extra>", name: "flagged" };
  const height = Math.max(240, Math.min(1400, 60 + 17 * y.length));  // a readable label per row (<= 65 rows)
  document.getElementById("heatmap").style.height = height + "px";
  Plotly.react("heatmap", [heat, flagged], { ...LAYOUT, margin: { ...LAYOUT.margin, l: 20 },
    xaxis: { title: { text: "window start step" } },
    yaxis: { type: "category", autorange: "reversed", automargin: true, tickmode: "array", tickvals: y, ticktext: y } }, CONFIG);
}

function drawGoodput(j) {
  const lost = Object.entries(j.lost_seconds || {}).filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]);
  const labels = ["productive", ...lost.map(([k]) => k)].map(plotlyText);
  const values = [j.productive_seconds || 0, ...lost.map(([, v]) => v)];
  Plotly.react("goodput", [{ type: "bar", orientation: "h", y: labels, x: values, marker: { color: values.map((_, i) => i ? "#c62828" : "#2e7d32") },
    hovertemplate: "%{y}: %{x:.1f} s<extra></extra>" }],
    { margin: { l: 160, r: 20, t: 10, b: 40 }, xaxis: { title: { text: "seconds" } }, yaxis: { autorange: "reversed" }, showlegend: false }, CONFIG);
}

// ------------------------------------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", async () => {
  getJSON("/api/settings").then((s) => { refreshMs = 1000 * s.refresh_seconds; }, () => { /* the default */ });
  const main = document.getElementById("main");
  const m = location.pathname.match(/^\/jobs\/([^/]+)$/);
  if (m) await jobPage(main, decodeURIComponent(m[1]));
  else await jobsPage(main);
});
