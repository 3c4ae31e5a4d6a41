// fedllm dashboard: polls the JSON API every 2 s and draws the federation with plain DOM + inline SVG.
// No framework, nothing loaded from outside the server. Data is written with textContent only.
"use strict";

const REFRESH_MS = 2000;
const CLIENT_ID = "dashboard";
const TOKEN_KEY = "fedllm-viewer-token";
const LOOPBACK_HOSTS = new Set(["localhost", "127.0.0.1", "[::1]"]);
const SVG_NS = "http://www.w3.org/2000/svg";
const W = 560, H = 200, PAD = { left: 54, right: 14, top: 12, bottom: 30 };

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let config = null;
let configRound = -1;
let timer = null;

class HttpError extends Error {
  constructor(status, body) { super(`HTTP ${status}: ${(body && (body.detail || body.error)) || ""}`); this.status = status; }
}

async function getJSON(path) {
  const headers = { "X-FedLLM-Client": CLIENT_ID, "Accept": "application/json" };
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new HttpError(response.status, body);
  return body;
}

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------------------------------ formatting
function fmtNumber(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Math.abs(v) >= 1000 || Number.isInteger(v)) return Math.round(v).toLocaleString("en-US");
  return String(parseFloat(Number(v).toPrecision(digits)));
}
function fmtBytes(v) {
  if (v === null || v === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? String(Math.round(v)) : String(parseFloat(v.toFixed(v >= 100 ? 0 : 1)))) + " " + units[i];
}
function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 90) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 5400) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}
function fmtAgo(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.max(0, seconds);
  return seconds < 1 ? "just now" : fmtSeconds(seconds) + " ago";
}

// ------------------------------------------------------------------------------------------ charts
function niceTicks(lo, hi, count = 4, integer = false) {
  if (lo === hi) { lo -= lo === 0 ? 1 : Math.abs(lo) * 0.1; hi += hi === 0 ? 1 : Math.abs(hi) * 0.1; }
  const raw = (hi - lo) / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  let step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  if (integer) step = Math.max(1, Math.round(step));
  const start = Math.floor(lo / step) * step, end = Math.ceil(hi / step) * step;
  const ticks = [];
  for (let t = start; t <= end + step / 2; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// series: [{name, label, kind: "line" | "bar", points: [{x, y}]}]
function drawChart(svg, series, opts) {
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points);
  const maxRound = Math.max(opts.maxRound || 1, ...all.map((p) => p.x), 1);
  svg.setAttribute("data-chart", opts.name);
  svg.setAttribute("data-points", String(series.length ? series[0].points.length : 0));
  if (!all.length) {
    svg.appendChild(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
      "no finished round yet"));
    return;
  }
  const ys = all.map((p) => p.y);
  let lo = opts.zero ? 0 : Math.min(...ys), hi = Math.max(...ys);
  if (opts.minHi !== undefined) hi = Math.max(hi, opts.minHi);
  // Bytes get ticks at round numbers of their unit (KiB, MiB, ...), counts at whole numbers.
  const unit = opts.binary ? Math.pow(1024, Math.max(0, Math.floor(Math.log(Math.max(hi, 1)) / Math.log(1024)))) : 1;
  const ticks = niceTicks(lo / unit, hi / unit, 4, !!opts.integer).map((t) => t * unit);
  lo = ticks[0]; hi = ticks[ticks.length - 1];
  const plotW = W - PAD.left - PAD.right, plotH = H - PAD.top - PAD.bottom;
  const slot = plotW / maxRound;
  const sx = (x) => PAD.left + (x - 0.5) * slot;
  const sy = (y) => PAD.top + plotH - ((y - lo) / (hi - lo || 1)) * plotH;

  for (const t of ticks) {
    svg.appendChild(el("svg:line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t), class: "grid-line" }));
    svg.appendChild(el("svg:text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" },
      opts.format(t)));
  }
  svg.appendChild(el("svg:line", { x1: PAD.left, x2: W - PAD.right, y1: PAD.top + plotH, y2: PAD.top + plotH, class: "axis" }));
  const every = Math.max(1, Math.ceil(maxRound / 12));
  for (let r = 1; r <= maxRound; r += every) {
    svg.appendChild(el("svg:text", { x: sx(r), y: H - 10, "text-anchor": "middle", class: "tick" }, String(r)));
  }
  svg.appendChild(el("svg:text", { x: W - PAD.right, y: H - 10, "text-anchor": "end", class: "tick" }, "round"));

  const bars = series.filter((s) => s.kind === "bar");
  for (const s of bars) {
    const bw = Math.min(36, slot * 0.7);
    const g = el("svg:g", { class: "series s-" + s.name, "data-series": s.name, "data-points": s.points.length });
    for (const p of s.points) {
      const y = sy(Math.max(p.y, lo));
      const rect = el("svg:rect", {
        x: sx(p.x) - bw / 2, y, width: bw, height: Math.max(0, sy(lo) - y), rx: 2,
        class: "pt", "data-round": p.x, "data-value": p.y,
      });
      rect.appendChild(el("svg:title", {}, `round ${p.x}: ${s.label} ${opts.format(p.y)}`));
      g.appendChild(rect);
    }
    svg.appendChild(g);
  }
  for (const s of series.filter((x) => x.kind === "line")) {
    const g = el("svg:g", { class: "series s-" + s.name, "data-series": s.name, "data-points": s.points.length });
    const pts = [...s.points].sort((a, b) => a.x - b.x);
    if (pts.length > 1) {
      g.appendChild(el("svg:polyline", { class: "line", points: pts.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ") }));
    }
    for (const p of pts) {
      const c = el("svg:circle", { cx: sx(p.x), cy: sy(p.y), r: 3.5, class: "pt", "data-round": p.x, "data-value": p.y });
      c.appendChild(el("svg:title", {}, `round ${p.x}: ${s.label} ${opts.format(p.y)}`));
      g.appendChild(c);
    }
    svg.appendChild(g);
  }
}

function legend(container, series) {
  container.replaceChildren(...series.map((s) => {
    const item = el("span");
    item.appendChild(el("span", { class: "swatch s-" + s.name }));
    item.appendChild(document.createTextNode(s.label));
    return item;
  }));
}

function points(history, key, map) {
  return history
    .filter((r) => (map ? true : typeof r[key] === "number"))
    .map((r) => ({ x: r.round, y: map ? map(r) : r[key] }));
}

function drawCharts(history, numRounds) {
  const loss = [{ name: "train_loss", label: "train loss", kind: "line", points: points(history, "train_loss") }];
  if (history.some((r) => typeof r.eval_loss === "number")) {
    loss.push({ name: "eval_loss", label: "eval loss (federated)", kind: "line", points: points(history, "eval_loss") });
  }
  drawChart($("chart-loss"), loss, { name: "loss", maxRound: numRounds, format: (v) => fmtNumber(v, 3) });
  legend($("loss-legend"), loss);

  const maxSampled = Math.max(0, ...history.map((r) => (r.sampled || []).length));
  drawChart($("chart-participants"), [
    { name: "participants", label: "participants", kind: "bar",
      points: points(history, null, (r) => (r.participants || []).length) },
  ], { name: "participants", maxRound: numRounds, zero: true, integer: true, minHi: maxSampled, format: (v) => fmtNumber(v) });

  drawChart($("chart-bytes"), [
    { name: "bytes_received", label: "bytes received", kind: "bar", points: points(history, "bytes_received") },
    { name: "bytes_sent", label: "bytes sent", kind: "line", points: points(history, "bytes_sent") },
  ], { name: "bytes", maxRound: numRounds, zero: true, binary: true, format: fmtBytes });

  const secs = [
    { name: "seconds", label: "round", kind: "line", points: points(history, "seconds") },
    { name: "aggregation_seconds", label: "aggregation", kind: "line", points: points(history, "aggregation_seconds") },
  ];
  drawChart($("chart-seconds"), secs, { name: "seconds", maxRound: numRounds, zero: true, format: fmtSeconds });
  legend($("seconds-legend"), secs);
}

// ------------------------------------------------------------------------------------------ panels
function drawHeader(round, history) {
  const phase = round.paused ? "paused" : round.phase;
  const pill = $("phase");
  pill.textContent = phase;
  pill.className = "pill pill-" + phase;
  pill.setAttribute("data-phase", round.phase);
  $("round").textContent = String(round.round);
  $("round").setAttribute("data-round", String(round.round));
  $("num-rounds").textContent = String(round.num_rounds);
  const done = history.length;
  $("progress-bar").style.width = `${Math.min(100, (100 * done) / Math.max(1, round.num_rounds))}%`;
  let text = `${done} of ${round.num_rounds} rounds aggregated`;
  if (round.phase === "waiting") {
    text += ` · waiting for clients: ${round.clients_joined} of ${round.num_clients ?? "?"} joined`;
  } else if (round.phase === "training" || round.phase === "aggregating") {
    const received = round.received ? round.received.length : round.num_received;
    const sampled = round.sampled ? round.sampled.length : round.num_sampled;
    text += ` · round ${round.round}: ${received} of ${sampled} updates received`;
    if (round.deadline) {
      const left = round.deadline - Date.now() / 1000;
      text += left > 0 ? ` · deadline in ${fmtSeconds(left)}` : " · deadline passed";
    }
    if (round.deadline_extensions) text += ` · ${round.deadline_extensions} deadline extension(s)`;
  } else if (round.phase === "finished") {
    text += " · federation finished";
  }
  if (round.dp) {  // differential privacy: what has been spent so far
    const eps = round.dp.epsilon === null ? "no guarantee (σ = 0)" : `ε = ${round.dp.epsilon.toFixed(2)}`;
    text += ` · DP (${round.dp.mode}): ${eps} at δ = ${round.dp.delta.toPrecision(2)}`;
    if (round.dp.rounds_allowed !== null && round.dp.rounds_allowed !== undefined) {
      text += `, budget ${round.dp.rounds_allowed} rounds`;
    }
  }
  if (round.secagg && round.secagg.stage) {  // secure aggregation: the open stage, and who dropped where
    const dropped = Object.entries(round.secagg.dropped || {}).filter(([, n]) => n > 0)
      .map(([stage, n]) => `${n} at ${stage}`).join(", ");
    text += ` · SecAgg+ stage ${round.secagg.stage} (${round.secagg.answered ?? 0}/${round.secagg.clients_in_stage})`;
    if (dropped) text += `, dropped ${dropped}`;
  }
  const c = round.communication;
  if (c) {  // the run's traffic, like FlowerTune's budget tracker
    text += ` · traffic ${fmtBytes(c.total_bytes)}`;
    if (c.budget_bytes) text += ` of ${fmtBytes(c.budget_bytes)} budget (${c.budget_state})`;
  }
  $("progress-text").textContent = text;
}

function drawSettings(cfg) {
  const f = cfg.federation, rc = cfg.round_config || {};
  const rows = [
    ["model", f.model_name_or_path],
    ["task", f.task],
    ["algorithm", f.fed_alg],
    ["rounds", f.num_rounds],
    ["clients", `${f.num_clients}, ${f.sample_clients} per round`],
    ["local steps", f.max_steps],
    ["learning rate", rc.learning_rate !== undefined ? fmtNumber(rc.learning_rate, 3) : f.learning_rate],
    ["LoRA", `r ${f.peft_lora_r}, alpha ${f.peft_lora_alpha}`],
    ["template", f.template],
    ["seq length", f.seq_length],
    ["wire dtype", f.wire_dtype],
    ["round timeout", f.round_timeout ? fmtSeconds(f.round_timeout) : "none"],
  ];
  // The model (often a long path) gets a row of its own; the rest go two to a row.
  $("settings").replaceChildren(...rows.flatMap(([k, v], i) => [
    el("dt", {}, k), el("dd", i === 0 ? { class: "full", title: String(v ?? "") } : {}, String(v ?? "–"))]));
}

function drawClients(data) {
  const tbody = $("clients").querySelector("tbody");
  const rows = data.clients.map((c) => {
    const tr = el("tr", { "data-client": c.client_id, "data-state": c.state });
    const state = el("td");
    state.appendChild(el("span", { class: "state state-" + c.state }, c.state));
    tr.append(
      el("td", {}, c.client_id), state, el("td", {}, fmtNumber(c.num_samples)), el("td", {}, String(c.rounds_joined)),
      el("td", {}, c.last_train_loss === null ? "–" : fmtNumber(c.last_train_loss, 4)),
      el("td", {}, fmtAgo(data.time - c.joined_at)), el("td", {}, fmtAgo(data.time - c.last_seen)),
    );
    return tr;
  });
  if (!rows.length) {
    const tr = el("tr");
    tr.appendChild(el("td", { colspan: 7, class: "muted" }, "no client has joined yet"));
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
  $("clients-count").textContent = `(${data.clients.length})`;
}

function showBanner(text) {
  $("banner").hidden = !text;
  $("banner").textContent = text || "";
}

function showLogin(message) {
  $("login").hidden = false;
  $("main").hidden = true;
  showBanner(message);
}

// ------------------------------------------------------------------------------------------ loop
async function refresh() {
  clearTimeout(timer);
  try {
    const [round, history, clients] = await Promise.all([getJSON("/v1/round"), getJSON("/v1/history"),
      getJSON("/v1/clients")]);
    if (!config || configRound !== round.round) {
      config = await getJSON("/v1/config");
      configRound = round.round;
      drawSettings(config);
    }
    $("login").hidden = true;
    $("main").hidden = false;
    showBanner("");
    drawHeader(round, history);
    drawClients(clients);
    drawCharts(history, round.num_rounds);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.setAttribute("data-loaded", "true");
  } catch (err) {
    if (err instanceof HttpError && (err.status === 401 || err.status === 403)) {
      showLogin(token ? "The token was refused: enter the viewer or admin token." : "");
      return;  // wait for the form
    }
    showBanner(`Cannot reach the server (${err.message}); retrying…`);
    $("updated").textContent = "disconnected";
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  // Tokens must not cross a network in cleartext: say so when the page itself came over plain HTTP.
  $("insecure").hidden = location.protocol === "https:" || LOOPBACK_HOSTS.has(location.hostname);
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token").value.trim();
    $("token").value = "";
    sessionStorage.setItem(TOKEN_KEY, token);
    refresh();
  });
  refresh();
});
