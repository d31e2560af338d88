// The cotune dashboard: plain JavaScript over the coordinator's /v1 routes, no framework and
// nothing fetched from elsewhere. Charts are small hand-drawn SVG (a few dozen lines) so the
// page ships without a charting library or a build step. Every value from the server goes
// into the page as text (textContent), never as HTML.
"use strict";

const TOKEN_KEY = "cotune.token";
const RUN_KEY = "cotune.run";
const POLL_MS = 2000;
const COLORS = ["#2f6fdf", "#e67e22", "#1e8e5a", "#8e44ad", "#c0392b", "#16a085"];

let role = null; // "admin" or "device", once signed in
let pollTimer = null;
let viewSeq = 0; // a newer view cancels the renders of an older one
const FOLLOW_AFTER_END_MS = 180000;
const endedAt = new Map(); // view -> when it saw its run end (null while running)

// ---------------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, detail) {
    super((detail && detail.message) || `HTTP ${status}`);
    this.status = status;
    this.detail = detail || {};
  }
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (options.json !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.json !== undefined ? JSON.stringify(options.json) : undefined,
    cache: "no-store",
  });
  if (response.status === 204) return null;
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) throw new ApiError(response.status, body && body.detail);
  return body;
}

function describe(err) {
  if (!(err instanceof ApiError)) return `the coordinator did not answer (${err.message})`;
  const hint = err.detail.hint ? ` ${err.detail.hint}` : "";
  return `${err.message}${hint}`;
}

// ---------------------------------------------------------------------------------------------
// DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "style") Object.assign(node.style, value); // CSSOM: allowed by the page's CSP
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);

function fill(id, ...children) { $(id).replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined)); }

function flash(message, ok = false) {
  const box = $("flash");
  box.textContent = message;
  box.className = ok ? "flash ok" : "flash";
  box.hidden = !message;
}

function stateBadge(state) { return el("span", { class: `state state-${state}`, text: state }); }

function fmtTime(value) {
  if (!value) return "–";
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

function fmtClock(value) {
  const date = new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleTimeString();
}

function fmtBytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n);
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit && Math.abs(value) < 100 ? 1 : 0)} ${units[unit]}`;
}

function fmtNum(n, digits = 3) {
  return typeof n === "number" && Number.isFinite(n) ? n.toFixed(digits) : "–";
}

function table(headers, rows, attrs = {}) {
  return el("table", attrs,
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null, text: h.label || h })))),
    el("tbody", {}, rows));
}

// ---------------------------------------------------------------------------------------------
// SVG line chart: series = [{name, points: [[x, y], ...]}]

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function lineChart(series, options = {}) {
  const drawn = series.filter((s) => s.points.length > 0);
  if (drawn.length === 0) return el("p", { class: "muted", text: options.empty || "no figures yet" });
  const W = 360, H = 180, L = 58, R = 10, T = 10, B = 26;
  const xs = drawn.flatMap((s) => s.points.map((p) => p[0]));
  const ys = drawn.flatMap((s) => s.points.map((p) => p[1]));
  const xMin = Math.min(...xs), xMax = Math.max(...xs);
  const yMin = options.yMin !== undefined ? Math.min(options.yMin, ...ys) : Math.min(...ys);
  let yMax = options.yMax !== undefined ? Math.max(options.yMax, ...ys) : Math.max(...ys);
  if (yMax === yMin) yMax = yMin + 1;
  const sx = (x) => L + (xMax === xMin ? (W - L - R) / 2 : ((x - xMin) / (xMax - xMin)) * (W - L - R));
  const sy = (y) => T + (1 - (y - yMin) / (yMax - yMin)) * (H - T - B);
  const fmtY = options.format || ((v) => fmtNum(v, 2));

  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": options.label || "chart" });
  for (let i = 0; i <= 4; i += 1) {
    const v = yMin + ((yMax - yMin) * i) / 4;
    root.append(svg("line", { class: "grid-line", x1: L, x2: W - R, y1: sy(v), y2: sy(v) }));
    const label = svg("text", { x: L - 4, y: sy(v) + 3, "text-anchor": "end" });
    label.textContent = fmtY(v);
    root.append(label);
  }
  root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  root.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  for (const x of [...new Set(xs)].sort((a, b) => a - b)) {
    const tick = svg("text", { x: sx(x), y: H - B + 14, "text-anchor": "middle" });
    tick.textContent = String(x);
    root.append(tick);
  }
  const legend = el("div", { class: "legend" });
  drawn.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const points = [...s.points].sort((a, b) => a[0] - b[0]);
    root.append(svg("polyline", {
      class: "series", stroke: color, points: points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "),
    }));
    for (const [x, y] of points) {
      const dot = svg("circle", { class: "pt", cx: sx(x), cy: sy(y), r: 3, fill: color, "data-series": s.name,
        "data-x": x, "data-y": y });
      const title = svg("title");
      title.textContent = `${s.name}, round ${x}: ${fmtY(y)}`;
      dot.append(title);
      root.append(dot);
    }
    legend.append(el("span", {}, el("i", { style: { background: color } }), s.name));
  });
  return el("div", {}, root, legend);
}

function metricSeries(rounds, path) {
  const points = [];
  for (const r of rounds) {
    let value = r.metrics;
    for (const key of path) value = value && typeof value === "object" ? value[key] : undefined;
    if (typeof value === "number" && Number.isFinite(value)) points.push([r.round, value]);
  }
  return points;
}

// ---------------------------------------------------------------------------------------------
// Sign-in and routing

function signedIn() { return Boolean(sessionStorage.getItem(TOKEN_KEY)); }

function show(view) {
  for (const id of ["signin-view", "runs-view", "run-view"]) $(id).hidden = id !== view;
  for (const node of document.querySelectorAll(".admin-only")) node.hidden = role !== "admin";
  $("signout").hidden = !signedIn();
  $("who").textContent = role === "admin" ? "signed in as admin"
    : role === "device" ? "signed in as a device (read-only)" : "";
}

function stopPolling() {
  if (pollTimer !== null) clearTimeout(pollTimer);
  pollTimer = null;
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(RUN_KEY);
  role = null;
  stopPolling();
  location.hash = "#/";
  route();
}

async function signIn(event) {
  event.preventDefault();
  const token = $("signin-token").value.trim();
  const runId = $("signin-run").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("signin-token").value = "";
  try {
    await detectRole(runId);
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    role = null;
    flash(describe(err));
    return;
  }
  flash("");
  if (role === "device") {
    sessionStorage.setItem(RUN_KEY, runId);
    location.hash = `#/runs/${encodeURIComponent(runId)}`;
  } else {
    location.hash = "#/";
  }
  route();
}

// Only the admin may list runs; any other token is tried as a device's, on the run it names.
async function detectRole(runId) {
  try {
    await api("/v1/runs");
    role = "admin";
    return;
  } catch (err) {
    if (err.status !== 401 && err.status !== 403) throw err;
  }
  if (!runId) {
    throw new ApiError(401, { message: "This is not the admin token.", hint: "For a device's token, also give the id of its run." });
  }
  try {
    await api(`/v1/runs/${encodeURIComponent(runId)}`);
  } catch (err) {
    if (err.status === 401) throw new ApiError(401, { message: "That token is not recognised (or was revoked)." });
    if (err.status === 403 || err.status === 404) throw new ApiError(err.status, { message: "This token may not read that run." });
    throw err;
  }
  role = "device";
}

async function route() {
  stopPolling();
  viewSeq += 1;
  if (!signedIn()) { role = null; show("signin-view"); return; }
  if (role === null) {
    try { await detectRole(sessionStorage.getItem(RUN_KEY) || ""); } catch (err) { signOut(); flash(describe(err)); return; }
  }
  const match = /^#\/runs\/([^/]+)$/.exec(location.hash);
  if (match) { show("run-view"); await runView(decodeURIComponent(match[1]), viewSeq); return; }
  if (role === "device") {
    location.hash = `#/runs/${encodeURIComponent(sessionStorage.getItem(RUN_KEY) || "")}`;
    return;
  }
  show("runs-view");
  await runsView(viewSeq);
}

function schedule(seq, again) {
  if (seq !== viewSeq) return;
  stopPolling();
  pollTimer = setTimeout(() => { if (seq === viewSeq) again(); }, POLL_MS);
}

// ---------------------------------------------------------------------------------------------
// Runs list

async function runsView(seq) {
  let runs;
  try { runs = await api("/v1/runs"); } catch (err) { if (seq === viewSeq) flash(describe(err)); schedule(seq, () => runsView(seq)); return; }
  if (seq !== viewSeq) return;
  const rows = runs.map((run) => el("tr", { "data-run": run.run_id },
    el("td", {}, el("a", { href: `#/runs/${encodeURIComponent(run.run_id)}`, text: run.name })),
    el("td", {}, stateBadge(run.state)),
    el("td", { text: run.algorithm }),
    el("td", {}, `${run.current_round} / ${run.rounds_total}`, progressBar(closedRounds(run), run.rounds_total)),
    el("td", { class: "num", text: run.num_clients }),
    el("td", { class: "error", text: run.error || "" })));
  if (rows.length === 0) rows.push(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "no runs yet" })));
  $("runs-table").querySelector("tbody").replaceChildren(...rows);
  if (runs.some((run) => run.state === "running")) schedule(seq, () => runsView(seq));
}

// The bar fills with the rounds that have closed, so a run on its last open round is not shown done.
function closedRounds(run) {
  return (run.rounds || []).filter((r) => r.round > 0 && r.state === "closed").length;
}

function progressBar(done, total) {
  const share = total > 0 ? Math.max(0, Math.min(1, done / total)) : 0;
  return el("span", { class: "bar" }, el("i", { style: { width: `${Math.round(share * 100)}%` } }));
}

async function createRun(event) {
  event.preventDefault();
  const text = $("create-spec").value.trim();
  let spec;
  try {
    spec = JSON.parse(text);
  } catch (err) {
    $("create-result").textContent = `Not JSON (${err.message}). Paste the run spec as JSON (the keys of a [run] table); TOML is not read here.`;
    $("create-result").className = "result error";
    return;
  }
  try {
    const created = await api("/v1/runs", { method: "POST", json: spec });
    $("create-result").textContent = `Run ${created.name} ${created.created ? "created" : "already exists"}.`;
    $("create-result").className = "result";
    route();
  } catch (err) {
    $("create-result").textContent = describe(err);
    $("create-result").className = "result error";
  }
}

// ---------------------------------------------------------------------------------------------
// One run

async function runView(runId, seq) {
  let run;
  try {
    run = await api(`/v1/runs/${encodeURIComponent(runId)}`);
  } catch (err) {
    if (seq !== viewSeq) return;
    $("run-title").textContent = "Run not available";
    const why = err.status === 403 || err.status === 404
      ? "This run does not exist, or this token may not read it (a device token sees only its own run)."
      : describe(err);
    fill("run-summary", el("p", { class: "error", id: "run-denied", text: why }));
    for (const id of ["timeline", "chart-rouge", "chart-em", "chart-bytes", "chart-epsilon", "bytes", "devices", "builds"]) fill(id);
    if (!(err instanceof ApiError)) schedule(seq, () => runView(runId, seq));
    return;
  }
  if (seq !== viewSeq) return;
  flash("");
  renderRun(run);
  const [devices, builds] = await Promise.allSettled([
    role === "admin" ? api(`/v1/runs/${encodeURIComponent(runId)}/clients`) : Promise.reject(new ApiError(403, {})),
    api(`/v1/runs/${encodeURIComponent(runId)}/builds`),
  ]);
  if (seq !== viewSeq) return;
  renderDevices(run, devices);
  renderBuilds(builds);
  // A run that ended while watched is followed a while longer: its edge builds are exported
  // after the last round closes.
  if (run.state === "running") endedAt.set(seq, null);
  else if (endedAt.get(seq) === null) endedAt.set(seq, Date.now());
  const ended = endedAt.get(seq);
  if (run.state === "running" || (ended && Date.now() - ended < FOLLOW_AFTER_END_MS)) {
    schedule(seq, () => runView(runId, seq));
  }
}

function renderRun(run) {
  $("run-title").textContent = `${run.name}`;
  fill("run-summary",
    el("span", {}, el("b", { text: "state" }), stateBadge(run.state)),
    el("span", {}, el("b", { text: "algorithm" }), run.algorithm),
    el("span", { id: "run-progress" }, el("b", { text: "round" }), `${run.current_round} / ${run.rounds_total}`,
      progressBar(closedRounds(run), run.rounds_total)),
    el("span", {}, el("b", { text: "devices" }), String(run.num_clients)),
    el("span", {}, el("b", { text: "id" }), el("code", { text: run.run_id })),
    run.error ? el("span", { class: "error", text: run.error }) : null);

  const rounds = run.rounds || [];
  renderTimeline(rounds);
  fill("chart-rouge", lineChart([
    { name: "SLM", points: metricSeries(rounds, ["slm", "rougeL"]) },
    { name: "LLM", points: metricSeries(rounds, ["llm", "rougeL"]) },
  ], { yMin: 0, label: "Rouge-L per round", empty: "no evaluated round yet" }));
  fill("chart-em", lineChart([
    { name: "SLM", points: metricSeries(rounds, ["slm", "em"]) },
    { name: "LLM", points: metricSeries(rounds, ["llm", "em"]) },
  ], { yMin: 0, label: "exact match per round", empty: "no evaluated round yet" }));
  renderBytes(rounds);
  const epsilon = metricSeries(rounds, ["privacy_epsilon_max"]);
  fill("chart-epsilon", lineChart([{ name: "ε (largest of the round's devices)", points: epsilon }],
    { yMin: 0, label: "epsilon per round", empty: "no device reported an ε: local differential privacy is off" }));
}

const PHASES = ["open", "collecting", "aggregating", "server_step", "publishing", "closed", "failed"];

function renderTimeline(rounds) {
  const live = rounds.filter((r) => r.round > 0);
  if (live.length === 0) { fill("timeline", el("p", { class: "muted", text: "no round has opened yet" })); return; }
  const rows = live.map((r) => {
    const times = { ...(r.phase_times || {}) };
    if (!times.open && r.opened_at) times.open = r.opened_at;
    if (!times.collecting && r.collecting_at) times.collecting = r.collecting_at;
    if (!times[r.state] && r.state === "closed" && r.closed_at) times.closed = r.closed_at;
    const steps = PHASES.filter((p) => times[p]).map((p) => el("span", { class: "step", title: fmtTime(times[p]) },
      stateBadge(p), " ", el("span", { class: "muted", text: fmtClock(times[p]) })));
    return el("tr", { "data-round": r.round },
      el("td", { class: "num", text: r.round }), el("td", {}, stateBadge(r.state)),
      el("td", { class: "steps" }, steps.length ? steps : el("span", { class: "muted", text: "–" })),
      el("td", { text: r.deadline ? fmtTime(r.deadline) : "–" }),
      el("td", { class: "num", text: `${r.num_updates} (${r.num_samples} samples)` }));
  });
  fill("timeline", table([{ label: "Round", num: true }, "State", "Entered", "Deadline", { label: "Updates", num: true }],
    rows, { class: "timeline", id: "timeline-table" }));
}

function renderBytes(rounds) {
  const up = [], down = [], rows = [];
  for (const r of rounds) {
    const clients = (r.metrics && r.metrics.clients) || {};
    const ids = Object.keys(clients);
    if (ids.length === 0) continue;
    let sumUp = 0, sumDown = 0;
    for (const id of ids.sort()) {
      const c = clients[id] || {};
      sumUp += Number(c.bytes_up) || 0;
      sumDown += Number(c.bytes_down) || 0;
      rows.push(el("tr", {}, el("td", { class: "num", text: r.round }), el("td", {}, el("code", { text: id })),
        el("td", { class: "num", text: fmtBytes(c.bytes_up) }), el("td", { class: "num", text: fmtBytes(c.bytes_down) }),
        el("td", { class: "num", text: c.num_samples ?? "–" })));
    }
    up.push([r.round, sumUp]);
    down.push([r.round, sumDown]);
  }
  fill("chart-bytes", lineChart([{ name: "up (all devices)", points: up }, { name: "down (all devices)", points: down }],
    { yMin: 0, format: fmtBytes, label: "bytes per round", empty: "no transfer yet" }));
  fill("bytes", rows.length
    ? table([{ label: "Round", num: true }, "Device", { label: "Up", num: true }, { label: "Down", num: true },
      { label: "Samples", num: true }], rows, { id: "bytes-table" })
    : el("p", { class: "muted", text: "no transfer yet" }));
}

function renderDevices(run, settled) {
  if (settled.status === "rejected") {
    const err = settled.reason;
    let why;
    if (role !== "admin" || err.status === 403) why = "The device list is for the admin.";
    else if (err.status === 404 || err.status === 405) why = `Device details are unavailable on this coordinator; the run has ${run.num_clients} active device(s).`;
    else why = describe(err);
    fill("devices", el("p", { class: "muted", id: "devices-unavailable", text: why }));
    return;
  }
  const devices = settled.value || [];
  if (devices.length === 0) { fill("devices", el("p", { class: "muted", text: "no device has enrolled yet" })); return; }
  const rows = devices.map((d) => {
    const profile = d.profile || {};
    const parts = [profile.arch, profile.ram_bytes ? `${fmtBytes(profile.ram_bytes)} RAM` : null,
      profile.cores ? `${profile.cores} cores` : null, (profile.backends || []).join("+") || null].filter(Boolean);
    const action = d.revoked ? null : el("button", { type: "button", class: "danger revoke", "data-client": d.client_id,
      text: "Revoke", onclick: () => revokeDevice(d) });
    return el("tr", { "data-client": d.client_id },
      el("td", { text: d.name }), el("td", {}, el("code", { text: d.client_id })),
      el("td", { text: parts.join(", ") || "–" }), el("td", { text: fmtTime(d.enrolled_at) }),
      el("td", { text: fmtTime(d.last_seen) }), el("td", { class: "num", text: d.updates_sent }),
      el("td", { class: "status" }, d.revoked ? stateBadge("revoked") : el("span", { class: "state", text: "active" })),
      el("td", {}, action));
  });
  fill("devices", table(["Name", "Id", "Profile", "Enrolled", "Last seen", { label: "Updates", num: true }, "Status", ""],
    rows, { id: "devices-table" }));
}

async function revokeDevice(device) {
  if (!window.confirm(`Revoke device ${device.name}? Its token stops working at once.`)) return;
  try {
    await api(`/v1/clients/${encodeURIComponent(device.client_id)}`, { method: "DELETE" });
    flash(`Device ${device.name} revoked.`, true);
  } catch (err) {
    flash(describe(err));
  }
  route();
}

function renderBuilds(settled) {
  if (settled.status === "rejected") {
    fill("builds", el("p", { class: "muted", text: `Builds unavailable: ${describe(settled.reason)}` }));
    return;
  }
  const builds = (settled.value && settled.value.builds) || [];
  if (builds.length === 0) { fill("builds", el("p", { class: "muted", text: "no build published yet" })); return; }
  const rows = builds.map((b) => {
    const m = b.manifest || {};
    const size = (b.files || []).reduce((sum, f) => sum + (Number(f.size) || 0), 0);
    const parity = Object.entries(m.parity || {}).filter(([, v]) => typeof v !== "object")
      .map(([k, v]) => `${k}: ${typeof v === "number" && !Number.isInteger(v) ? fmtNum(v, 4) : v}`).join(", ");
    return el("tr", { "data-build": b.name },
      el("td", { text: b.name }), el("td", { class: "num", text: b.round }),
      el("td", { text: `${m.format || "?"} ${m.quantization || ""}` }), el("td", { class: "num", text: fmtBytes(size) }),
      el("td", { text: parity || "–" }), el("td", { text: fmtTime(m.created_at) }));
  });
  fill("builds", table(["Name", { label: "Round", num: true }, "Format", { label: "Size", num: true }, "Parity", "Made"],
    rows, { id: "builds-table" }));
}

async function publishBuilds(event) {
  event.preventDefault();
  const match = /^#\/runs\/([^/]+)$/.exec(location.hash);
  if (!match) return;
  const targets = $("publish-targets").value.split(",").map((t) => t.trim()).filter(Boolean);
  const result = $("publish-result");
  if (targets.length === 0) { result.textContent = "Name at least one target, e.g. gguf:q8_0."; result.className = "result error"; return; }
  result.textContent = "exporting…";
  result.className = "result";
  try {
    const made = await api(`/v1/runs/${encodeURIComponent(decodeURIComponent(match[1]))}/builds`, { method: "POST", json: { targets } });
    result.textContent = `Published ${made.map((b) => b.name).join(", ")}.`;
    route();
  } catch (err) {
    result.textContent = describe(err);
    result.className = "result error";
  }
}

// ---------------------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  $("create-form").addEventListener("submit", createRun);
  $("publish-form").addEventListener("submit", publishBuilds);
  route();
});
