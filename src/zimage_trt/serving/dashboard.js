// zimage-trt dashboard: polls v1/stats once a second and draws it on canvases (no libraries).
// A stats body may hold {"replicas": [stats, ...]} (a Ray Serve deployment): the page merges them.
// Every request says which task it ran (text-to-image, image-to-image, inpaint, controlnet, controlnet-inpaint).
"use strict";

const POLL_MS = 1000;
const KEEP = 300; // client-side history: 5 minutes of GPU and queue samples
const gpuHistory = [];
const queueHistory = [];
const state = { key: sessionStorage.getItem("zimage-api-key") || "", latencyPoints: 0, slowedPoints: 0, tasks: {} };
const SLOWED_ROWS = 8;
window.dashboard = state; // read by the browser test

const $ = (id) => document.getElementById(id);

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function percentile(sorted, p) {
  if (!sorted.length) return NaN;
  const pos = (sorted.length - 1) * p / 100, lo = Math.floor(pos), hi = Math.min(lo + 1, sorted.length - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
}

function fmtMs(ms) {
  if (!isFinite(ms)) return "-";
  return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(ms >= 100 ? 0 : 1) + " ms";
}

// Merge replicas (Ray) into one view; a single server's stats pass through unchanged.
function merge(stats) {
  const parts = Array.isArray(stats.replicas) ? stats.replicas : [stats];
  const out = { state: stats.state, device: stats.device, sizes: stats.sizes || [], recent: [], waiting: [],
                running: [], depth: 0, gpus: [], lastSteps: [], completed: 0, failed: 0, sharing: [],
                tasks: (stats.tasks || {}).recent || {}, served: (stats.tasks || {}).served || [] };
  parts.forEach((p, i) => {
    out.state = out.state || p.state;
    out.device = out.device || p.device;
    if (!out.sizes.length && p.sizes) out.sizes = p.sizes;
    (p.recent || []).forEach((r) => out.recent.push(r));
    const q = p.queue || {};
    out.depth += q.depth || 0;
    (q.waiting || []).forEach((w) => out.waiting.push(Object.assign({ replica: i }, w)));
    if (q.running) out.running.push(Object.assign({ replica: i }, q.running));
    if (p.gpu && Object.keys(p.gpu).length) out.gpus.push(p.gpu);
    if (p.gpu_sharing && p.gpu_sharing.current) out.sharing.push(p.gpu_sharing.current);
    if (p.last_steps_ms && p.last_steps_ms.length) out.lastSteps = p.last_steps_ms;
    out.completed += (p.counts || {}).completed || 0;
    out.failed += (p.counts || {}).failed || 0;
  });
  if (parts.length > 1) out.device = parts.length + " replicas";
  out.recent.sort((a, b) => a.t - b.t);
  return out;
}

// -- drawing -----------------------------------------------------------------------------------
function setup(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, w, h };
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v))), m = v / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 2.5 ? 2.5 : m <= 5 ? 5 : 10) * p;
}

// series: [{points: [[x, y]...], color, label, bars}], hlines: [{y, color, label}]
function chart(canvas, series, opts) {
  const { ctx, w, h } = setup(canvas);
  const left = 48, right = 8, top = 16, bottom = 18;
  const all = series.flatMap((s) => s.points);
  const ys = all.map((p) => p[1]).concat((opts.hlines || []).map((l) => l.y)).filter(isFinite);
  const xs = all.map((p) => p[0]);
  const ymax = opts.ymax || niceMax(Math.max(0, ...ys) * 1.1);
  const xmin = opts.xmin !== undefined ? opts.xmin : xs.length ? Math.min(...xs) : 0;
  const xmax = opts.xmax !== undefined ? opts.xmax : xs.length ? Math.max(...xs) : 1;
  const X = (x) => left + (xmax > xmin ? (x - xmin) / (xmax - xmin) : 0.5) * (w - left - right);
  const Y = (y) => top + (1 - Math.min(y, ymax) / ymax) * (h - top - bottom);
  ctx.strokeStyle = "#262c38"; ctx.fillStyle = "#8a93a6"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4, y = Y(v);
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(w - right, y); ctx.stroke();
    ctx.fillText(opts.fmt ? opts.fmt(v) : v.toFixed(ymax < 10 ? 1 : 0), 2, y + 4);
  }
  ctx.fillText(opts.title || "", left, 11);
  if (!all.length) { ctx.fillText("no data yet", left + 8, h / 2); return; }
  series.forEach((s) => {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 1.5;
    if (s.bars) {
      const bw = Math.max(2, (w - left - right) / (xmax - xmin) - 4);
      s.points.forEach(([x, y]) => ctx.fillRect(X(x) - bw / 2, Y(y), bw, Y(0) - Y(y)));
      return;
    }
    if (s.line !== false) {
      ctx.beginPath();
      s.points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
      ctx.stroke();
    }
    const r = s.radius || 2.2;
    if (s.dots) s.points.forEach(([x, y]) => { ctx.beginPath(); ctx.arc(X(x), Y(y), r, 0, 7); ctx.fill(); });
  });
  let lx = w - right;
  (opts.hlines || []).forEach((l) => {
    if (!isFinite(l.y)) return;
    ctx.strokeStyle = l.color; ctx.setLineDash([5, 4]);
    ctx.beginPath(); ctx.moveTo(left, Y(l.y)); ctx.lineTo(w - right, Y(l.y)); ctx.stroke(); ctx.setLineDash([]);
    const text = l.label + " " + (opts.fmt ? opts.fmt(l.y) : l.y.toFixed(0));
    lx -= ctx.measureText(text).width + 10;
    ctx.fillStyle = l.color; ctx.fillText(text, lx, 11);
  });
}

function fillTable(table, rows) {
  table.tBodies[0].replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    cells.forEach((c) => { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); });
    return tr;
  }));
}

// -- one poll ----------------------------------------------------------------------------------
function render(stats) {
  const s = merge(stats);
  const badge = $("state");
  badge.textContent = s.state || "?"; badge.className = "badge " + (s.state || "");
  $("device").textContent = s.gpus.length ? s.gpus.map((g) => g.name || "gpu").join(", ") : (s.device || "-");
  $("depth").textContent = s.depth;
  $("served").textContent = s.completed;
  $("failed").textContent = s.failed;

  const times = s.recent.map((r) => r.per_image_ms).filter(isFinite);
  const sorted = times.slice().sort((a, b) => a - b);
  const p50 = percentile(sorted, 50), p95 = percentile(sorted, 95);
  $("p50").textContent = fmtMs(p50); $("p95").textContent = fmtMs(p95);
  const t0 = s.recent.length ? s.recent[0].t : 0;
  const lat = $("latency");
  // An image that ran beside another process or under a throttled clock is marked, with its cause below.
  const slowed = s.recent.filter((r) => r.slowed_by && r.slowed_by.length);
  chart(lat, [{ points: s.recent.map((r) => [r.t - t0, r.per_image_ms]), color: "#5fb3f9", dots: true },
              { points: slowed.map((r) => [r.t - t0, r.per_image_ms]), color: "#e5534b", dots: true, line: false, radius: 4 }],
        { hlines: [{ y: p50, color: "#3fb950", label: "p50" }, { y: p95, color: "#f5a623", label: "p95" }], fmt: fmtMs });
  state.latencyPoints = s.recent.length;
  state.slowedPoints = slowed.length;
  lat.dataset.points = String(s.recent.length);
  fillTable($("slowed"), slowed.slice(-SLOWED_ROWS).reverse().map((r) =>
    [new Date(r.t * 1000).toLocaleTimeString(), r.task || "-", fmtMs(r.per_image_ms), r.slowed_by.join("; ")]));
  const causes = [];
  s.sharing.forEach((c) => (c.causes || []).forEach((x) => { if (!causes.includes(x)) causes.push(x); }));
  $("shared").textContent = causes.join(" · ");
  $("shared").style.display = causes.length ? "" : "none";

  chart($("steps"), [{ points: s.lastSteps.map((ms, i) => [i + 1, ms]), color: "#a371f7", bars: true }],
        { fmt: fmtMs, title: s.lastSteps.length ? s.lastSteps.length + " steps" : "", xmin: 0.5, xmax: s.lastSteps.length + 0.5 });

  const now = Date.now() / 1000;
  queueHistory.push([now, s.depth]); if (queueHistory.length > KEEP) queueHistory.shift();
  chart($("queue"), [{ points: queueHistory.map(([t, d]) => [t - now, d]), color: "#f5a623" }], { ymax: 4 * Math.ceil(Math.max(4, ...queueHistory.map((q) => q[1])) / 4), fmt: (v) => v.toFixed(0) });

  const gpu = s.gpus[0];
  $("gpu-none").style.display = gpu ? "none" : "block";
  $("gpu-grid").style.display = gpu ? "grid" : "none";
  if (gpu) { gpuHistory.push([now, gpu]); if (gpuHistory.length > KEEP) gpuHistory.shift(); }
  const gpuChart = (id, key, color, title, opts) => chart($(id),
    [{ points: gpuHistory.filter(([, g]) => isFinite(g[key])).map(([t, g]) => [t - now, g[key]]), color }],
    Object.assign({ title: title + (gpu && isFinite(gpu[key]) ? ": " + gpu[key].toFixed(0) : "") }, opts || {}));
  gpuChart("gpu-clock", "sm_clock_mhz", "#5fb3f9", "SM clock MHz");
  gpuChart("gpu-temp", "temperature_c", "#e5534b", "temperature C");
  gpuChart("gpu-power", "power_w", "#f5a623", "power W");
  gpuChart("gpu-util", "gpu_util_pct", "#3fb950", "utilisation %", { ymax: 100 });

  const rows = s.running.map((r) => [r.request_id, r.task || "-", r.size, r.n + " x " + r.steps,
    "running " + (r.image + 1) + "/" + r.n + ", step " + r.step + "/" + r.steps, "done in ~" + fmtMs(r.eta_done_s * 1000)])
    .concat(s.waiting.sort((a, b) => a.eta_start_s - b.eta_start_s).map((w) => [w.request_id, w.task || "-", w.size,
      w.n + " x " + w.steps, "waiting #" + (w.position + 1),
      "starts in ~" + fmtMs(w.eta_start_s * 1000) + ", done ~" + fmtMs(w.eta_done_s * 1000)]));
  fillTable($("waiting"), rows.map((cells) => [String(cells[0]).slice(0, 8)].concat(cells.slice(1))));

  // Which task the recent requests ran: one row a task, with its per-image latency.
  state.tasks = s.tasks;
  fillTable($("tasks"), Object.keys(s.tasks).sort().map((task) => {
    const t = s.tasks[task], lat = t.per_image_ms || {};
    return [task, String(t.requests), String(t.images), fmtMs(lat.p50 ?? NaN), fmtMs(lat.p95 ?? NaN)];
  }));
  $("tasks-served").textContent = s.served.length ? s.served.join(", ") : "-";

  const select = $("size");
  if (select.options.length !== s.sizes.length) {
    select.replaceChildren(...s.sizes.map((size) => { const o = document.createElement("option"); o.textContent = size; return o; }));
  }
}

async function poll() {
  try {
    const r = await fetch("v1/stats", { headers: headers(), cache: "no-store" });
    if (r.status === 401) { $("keybox").classList.add("shown"); $("state").textContent = "API key needed"; }
    else if (r.ok) render(await r.json());
  } catch (e) {
    $("state").textContent = "unreachable"; $("state").className = "badge failed";
  }
  setTimeout(poll, POLL_MS);
}

// -- generating from the page: POST ?stream=true, read the server-sent events from the body --------
function message(text, isError) { const m = $("message"); m.textContent = text; m.className = isError ? "error" : ""; }

async function generate(event) {
  event.preventDefault();
  const body = { prompt: $("prompt").value, size: $("size").value || undefined, n: 1,
                 num_inference_steps: Number($("steps-input").value), guidance_scale: Number($("guidance").value) };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  $("go").disabled = true; $("progress").value = 0; message("sending...");
  try {
    const r = await fetch("v1/images/generations?stream=true", {
      method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
    if (!r.ok) {
      const err = (await r.json().catch(() => ({}))).error || {};
      const fields = (err.errors || []).map((e) => e.field + ": " + e.allowed).join("; ");
      if (r.status === 401) $("keybox").classList.add("shown");
      message(r.status + " " + (err.message || r.statusText) + (fields ? " (" + fields + ")" : ""), true);
      return;
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        handleEvent(buffer.slice(0, cut)); buffer = buffer.slice(cut + 2);
      }
    }
  } catch (e) {
    message("request failed: " + e, true);
  } finally {
    $("go").disabled = false;
  }
}

function handleEvent(block) {
  let name = "message"; const data = [];
  block.split("\n").forEach((line) => {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  });
  if (!data.length) return;
  const d = JSON.parse(data.join("\n"));
  if (name === "queued") message("queued at position " + (d.position + 1) + ", starts in ~" + fmtMs(d.estimated_start_s * 1000));
  else if (name === "started") message("started after " + fmtMs(d.queue_wait_ms) + " in the queue");
  else if (name === "step") { $("progress").value = d.step / d.steps; message("step " + d.step + "/" + d.steps + " (" + fmtMs(d.ms) + ")"); }
  else if (name === "done") {
    const item = d.data[0];
    const img = document.createElement("img");
    img.id = "generated"; img.alt = "generated image, seed " + item.seed;
    img.src = "data:image/png;base64," + item.b64_json;
    $("result").replaceChildren(img);
    message("done: seed " + item.seed + ", " + fmtMs(d.timings.run_ms) + " (queue " + fmtMs(d.timings.queue_wait_ms) + ")");
    $("progress").value = 1;
  } else if (name === "error") message(d.status + " " + d.error.message + " (request " + d.error.request_id + ")", true);
}

$("generate").addEventListener("submit", generate);
$("keysave").addEventListener("click", () => {
  state.key = $("apikey").value.trim(); sessionStorage.setItem("zimage-api-key", state.key); $("keybox").classList.remove("shown");
});
$("apikey").value = state.key;
poll();
