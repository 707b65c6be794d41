// The operator console: reads the JSON API under /api/v1/ every two seconds and redraws the
// view its path names (/, /farms/{id}, /aggregations/{id}). Every value is put in the page as
// text (textContent), never as markup, whatever a caller chose to send.
"use strict";

const REFRESH_MS = 2000;
const main = document.getElementById("main");
const live = document.getElementById("live");
const login = document.getElementById("login");
let state = { order: "farm", offset: 0, sortKey: null, sortDown: false };
let timer = null;

// ---- fetching -------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem("dsg-token");
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (resp.status === 401) throw new Unauthorized();
  const body = await resp.json().catch(() => ({ error: "bad_response", message: "not JSON" }));
  if (!resp.ok) {
    const e = new Error(body.message || resp.statusText);
    e.status = resp.status;
    throw e;
  }
  return body;
}

// ---- building the page ----------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function link(href, text) {
  return el("a", { href }, text);
}

function aggLink(id) {
  return el("a", { href: "/aggregations/" + encodeURIComponent(id), class: "mono" }, id);
}

function farmLink(id) {
  return el("a", { href: "/farms/" + encodeURIComponent(id), class: "mono" }, id);
}

function stateBadge(s, id) {
  return s ? el("span", { class: "state " + s, id }, s) : el("span", { class: "muted", id }, "—");
}

function card(label, value, sub, id) {
  return el("div", { class: "card", id }, el("div", { class: "label" }, label), el("div", { class: "value" }, value), sub ? el("div", { class: "sub" }, sub) : null);
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.abs(Math.round(seconds));
  if (s < 90) return s + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function fmtWhen(iso) {
  if (!iso) return el("span", { class: "muted" }, "—");
  const t = Date.parse(iso);
  const delta = (t - Date.now()) / 1000;
  const rel = Math.abs(delta) < 1 ? "now" : delta > 0 ? "in " + fmtDuration(delta) : fmtDuration(-delta) + " ago";
  return el("span", { title: iso }, rel);
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function used(pair) {
  return pair.limit ? pair.used + " / " + pair.limit : String(pair.used);
}

function summary(req) {
  if (!req) return "";
  const ids = req.resource_ids.length === 1 ? req.resource_ids[0] : req.resource_ids.length + " " + req.resource_kind;
  const window = req.start_time.slice(0, 16).replace("T", " ") + " → " + req.end_time.slice(0, 16).replace("T", " ");
  const by = req.group_by.length ? " by " + req.group_by.join(", ").toLowerCase() : "";
  return ids + ", " + window + ", " + (req.period || "DAILY").toLowerCase() + by;
}

function table(id, columns, rows, sortable) {
  const head = el("tr", {}, columns.map((c, i) => {
    const attrs = { class: (c.num ? "num " : "") + (sortable ? "sortable" : "") };
    if (sortable) attrs.onclick = () => { state.sortDown = state.sortKey === i ? !state.sortDown : false; state.sortKey = i; refresh(); };
    const arrow = sortable && state.sortKey === i ? (state.sortDown ? " ▼" : " ▲") : "";
    return el("th", attrs, c.title + arrow);
  }));
  if (sortable && state.sortKey !== null) {
    const key = columns[state.sortKey].key;
    rows = rows.slice().sort((a, b) => {
      const x = key(a.data), y = key(b.data);
      const c = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1;
      return state.sortDown ? -c : c;
    });
  }
  const body = rows.length
    ? rows.map((r) => el("tr", r.attrs, columns.map((c) => el("td", { class: c.num ? "num" : "" }, c.cell(r.data)))))
    : [el("tr", {}, el("td", { colspan: columns.length, class: "muted" }, "nothing"))];
  return el("table", { id }, el("thead", {}, head), el("tbody", {}, body));
}

// ---- views ----------------------------------------------------------------------------------

async function overview() {
  const limit = 100;
  const [o, f] = await Promise.all([
    api("/api/v1/overview"),
    api(`/api/v1/farms?limit=${limit}&offset=${state.offset}&order=${state.order}`),
  ]);
  const store = o.store;
  const storeSub = store.kind === "redis"
    ? (store.up ? "up" : "UNREACHABLE") + (store.latency_ms !== null ? ", " + store.latency_ms.toFixed(1) + " ms" : "") + (store.used_bytes !== null ? ", " + fmtBytes(store.used_bytes) + (store.max_bytes ? " of " + fmtBytes(store.max_bytes) : "") : "")
    : "this process only";
  const up = o.upstream;
  const calls = (c) => c.ok + " ok, " + c.throttled + " throttled, " + c.errors + " errors";
  const pace = (p) => p.per_second > 0 ? p.per_second + "/s" : "unpaced";
  const cards = el("div", { class: "cards" },
    card("Version", o.version, "build " + o.build + ", up " + fmtDuration(o.uptime_seconds), "card-version"),
    card("Store", store.kind, storeSub, "card-store"),
    card("Replicas", o.replicas.length, o.replicas.map((r) => r.id + " (" + r.farms_held + " farms)").join(", "), "card-replicas"),
    card("Active aggregations", used(o.bounds.active_aggregations), o.work.queued + " queued, " + o.work.running + " running", "card-active"),
    card("Farms with work", used(o.bounds.farms), "queue capacity " + o.bounds.farm_queue_capacity + " per farm", "card-farms"),
    card("Cache", fmtBytes(o.bounds.cache_bytes.used) + " / " + fmtBytes(o.bounds.cache_bytes.limit),
      o.cache.entries + " results, hit ratio " + (o.cache.hit_ratio === null ? "—" : (100 * o.cache.hit_ratio).toFixed(0) + " %") + " (last " + fmtDuration(up.window_seconds) + ")", "card-cache"),
    card("Upstream Starts", pace(up.start.pacing), calls(up.start.calls) + " (last " + fmtDuration(up.window_seconds) + ")", "card-starts"),
    card("Upstream Gets", pace(up.get.pacing), calls(up.get.calls), "card-gets"),
    card("Refreshes / splits running", o.work.refreshes_running + " / " + o.work.splits_running, null, "card-running"),
  );
  const columns = [
    { title: "Farm", key: (f) => f.farm_id, cell: (f) => farmLink(f.farm_id) },
    { title: "Running", key: (f) => f.head && f.head.state === "RUNNING" ? f.head.id : null, cell: (f) => f.head ? [stateBadge(f.head.state), " ", aggLink(f.head.id)] : "—" },
    { title: "Since", key: (f) => f.head && f.head.running_since, cell: (f) => fmtWhen(f.head && f.head.running_since) },
    { title: "Part", key: (f) => f.head && f.head.parts, cell: (f) => f.head && f.head.parts ? f.head.parts_done + " of " + f.head.parts : "—" },
    { title: "Est. completion", key: (f) => f.head && f.head.estimated_completion, cell: (f) => fmtWhen(f.head && f.head.estimated_completion) },
    { title: "Driven by", key: (f) => f.holder, cell: (f) => f.holder || "—" },
    { title: "Route", key: (f) => f.route, cell: (f) => f.route || "not routed" },
    { title: "Queued", num: true, key: (f) => f.queued, cell: (f) => f.queued },
    { title: "Oldest wait", num: true, key: (f) => f.oldest_wait_seconds, cell: (f) => fmtDuration(f.oldest_wait_seconds) },
  ];
  const rows = f.farms.map((farm) => ({ data: farm, attrs: { "data-farm": farm.farm_id } }));
  const order = el("select", { "aria-label": "order" },
    el("option", { value: "farm", selected: state.order === "farm" }, "by farm id"),
    el("option", { value: "queued", selected: state.order === "queued" }, "longest queue first"));
  order.addEventListener("change", () => { state.order = order.value; state.offset = 0; refresh(); });
  const pager = el("div", { class: "pager" },
    el("span", { class: "muted" }, f.total ? `farms ${f.offset + 1}–${f.offset + f.farms.length} of ${f.total}` : "no farm has work"),
    order,
    f.offset > 0 ? el("button", { onclick: () => { state.offset = Math.max(0, state.offset - limit); refresh(); } }, "previous") : null,
    f.offset + f.farms.length < f.total ? el("button", { onclick: () => { state.offset += limit; refresh(); } }, "next") : null);
  return [el("h1", {}, "Overview"), cards, el("h2", {}, "Farms with work"), pager, table("farms", columns, rows, true)];
}

async function farm(id) {
  const f = await api("/api/v1/farms/" + encodeURIComponent(id) + "?limit=200");
  const queueCols = [
    { title: "#", num: true, cell: (q) => q.position },
    { title: "Aggregation", cell: (q) => aggLink(q.id) },
    { title: "State", cell: (q) => stateBadge(q.state) },
    { title: "Class", cell: (q) => q.class },
    { title: "Request", cell: (q) => summary(q.request) },
    { title: "Callers", cell: (q) => q.callers.length ? q.callers.join(", ") : "—" },
    { title: "Waiting", num: true, cell: (q) => fmtDuration(q.waiting_seconds) },
    { title: "Est. start", cell: (q) => q.state === "RUNNING" ? fmtWhen(q.running_since) : fmtWhen(q.estimate.start) },
    { title: "Est. completion", cell: (q) => fmtWhen(q.estimate.completion) },
  ];
  const recentCols = [
    { title: "Aggregation", cell: (e) => aggLink(e.aggregation_id) },
    { title: "Outcome", cell: (e) => stateBadge(e.state) },
    { title: "Ended", cell: (e) => fmtWhen(e.at) },
    { title: "Duration", num: true, cell: (e) => fmtDuration(e.duration_seconds) },
    { title: "Rows", num: true, cell: (e) => e.rows },
    { title: "Estimate off by", num: true, cell: (e) => e.estimate_error_seconds === null ? "—" : fmtDuration(e.estimate_error_seconds) },
    { title: "Error", cell: (e) => e.error || "" },
  ];
  return [
    el("h1", {}, "Farm ", el("span", { class: "mono", id: "farm-id" }, f.farm_id)),
    el("p", {}, f.length + " in the queue", f.holder ? [", driven by ", el("span", { class: "mono", id: "holder" }, f.holder)] : null,
      ", upstream route ", el("span", { class: "mono", id: "route" }, f.route || "none (not routed)")),
    el("h2", {}, "Queue"),
    table("queue", queueCols, f.queue.map((q) => ({ data: q, attrs: { "data-aggregation": q.id } })), false),
    el("h2", {}, "Recent (last 50)"),
    table("recent", recentCols, f.recent.map((e) => ({ data: e, attrs: { "data-aggregation": e.aggregation_id } })), false),
  ];
}

function describe(e) {
  switch (e.event) {
    case "queued": return e.caller ? ["queued by ", el("b", {}, e.caller)] : "queued by refresh-ahead";
    case "joined": return ["joined by ", el("b", {}, e.caller)];
    case "derived": return ["answered for ", el("b", {}, e.caller), " from the rows of ", aggLink(e.from)];
    case "driving": return ["taken by replica ", el("span", { class: "mono" }, e.holder)];
    case "running": return ["running upstream as ", el("span", { class: "mono" }, e.upstream_id)];
    case "split": return "too large upstream: split into " + e.parts + " parts";
    case "part_started": return ["part " + e.part + " of " + e.parts + " running upstream as ", el("span", { class: "mono" }, e.upstream_id)];
    case "ended": return [stateBadge(e.state), " " + e.rows + " rows after " + fmtDuration(e.duration_seconds) + (e.error ? ": " + e.error : "")];
    case "discarded": return "taken off the queue: " + e.fault;
    default: return e.event;
  }
}

function safeUrl(url) {
  return typeof url === "string" && /^https?:\/\//i.test(url) ? url : null;
}

function terminal(s) {
  return s === "COMPLETED" || s === "FAILED" || s === "TIMED_OUT";
}

// What was predicted when it began running, and how far off that was.
function predicted(a) {
  const ended = a.timeline.filter((e) => e.event === "ended").pop();
  if (!a.estimated_completion) return "—";
  const off = ended && ended.estimate_error_seconds !== null && ended.estimate_error_seconds !== undefined
    ? " (it ended " + fmtDuration(ended.estimate_error_seconds) + (ended.estimate_error_seconds >= 0 ? " later)" : " earlier)")
    : "";
  return [el("span", { title: a.estimated_completion }, a.estimated_completion.slice(11, 19) + " UTC"), off];
}

async function aggregation(id) {
  const a = await api("/api/v1/aggregations/" + encodeURIComponent(id));
  const fields = [
    ["State", stateBadge(a.state, "agg-state")],
    ["Farm", a.farm_id ? farmLink(a.farm_id) : "—"],
    ["Request", a.request ? summary(a.request) : "—"],
    ["Queue position", a.queue_position === null || a.queue_position === undefined ? "—" : String(a.queue_position)],
    ["Upstream id", a.upstream_id || "—"],
    ["Created", fmtWhen(a.created)],
    ["Running since", fmtWhen(a.running_since)],
    ["Est. start", fmtWhen(a.estimate && a.estimate.start)],
    terminal(a.state)
      ? ["Predicted completion", predicted(a)]
      : ["Est. completion", fmtWhen((a.estimate && a.estimate.completion) || a.estimated_completion)],
    ["Expires", fmtWhen(a.expire_time)],
    ["Rows", a.row_count === undefined ? "—" : String(a.row_count)],
    ["Parts", a.split && a.split.length ? a.parts_done + " of " + a.split.length + " done" : "—"],
    ["Driven by", a.holder || "—"],
    ["Error", a.error ? a.error.code + ": " + a.error.message : "—"],
    ["Trace", safeUrl(a.trace_url) ? el("a", { href: safeUrl(a.trace_url), id: "trace-link", rel: "noreferrer", target: "_blank" }, a.trace_id) : a.trace_id || "—"],
  ];
  const out = [
    el("h1", {}, "Aggregation ", el("span", { class: "mono", id: "agg-id" }, a.id)),
    a.note ? el("p", { class: "muted", id: "note" }, a.note) : null,
    el("dl", { class: "fields" }, fields.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    el("h2", {}, "Callers"),
    a.callers.length ? el("ul", { id: "callers" }, a.callers.map((c) => el("li", {}, c))) : el("p", { class: "muted" }, "none recorded"),
    el("h2", {}, "Timeline"),
    el("ol", { class: "timeline", id: "timeline" }, a.timeline.map((e) => el("li", { "data-event": e.event }, el("span", { class: "when" }, fmtWhen(e.at)), describe(e)))),
  ];
  if (a.rows_preview && a.rows_preview.length) {
    const keys = Object.keys(a.rows_preview[0]).filter((k) => a.rows_preview.some((r) => r[k] !== null && typeof r[k] !== "object"));
    const cols = keys.map((k) => ({ title: k, cell: (r) => r[k] === null ? "" : r[k] }));
    cols.push({ title: "cost_in_usd", cell: (r) => r.cost_in_usd ? JSON.stringify(r.cost_in_usd) : "" });
    out.push(el("h2", {}, "First rows (" + a.rows_preview.length + " of " + a.row_count + ")"), table("rows", cols, a.rows_preview.map((r) => ({ data: r, attrs: {} })), false));
  }
  return out;
}

// ---- the loop -------------------------------------------------------------------------------

function view() {
  const path = location.pathname;
  let m = path.match(/^\/farms\/([^/]+)$/);
  if (m) return () => farm(decodeURIComponent(m[1]));
  m = path.match(/^\/aggregations\/([^/]+)$/);
  if (m) return () => aggregation(decodeURIComponent(m[1]));
  return overview;
}

async function refresh() {
  clearTimeout(timer);
  try {
    const content = await view()();
    login.hidden = true;
    main.hidden = false;
    main.replaceChildren(...content.flat(Infinity).filter((c) => c));
    live.textContent = "live · " + new Date().toLocaleTimeString();
    live.classList.remove("stale");
    document.body.dataset.loaded = "true";
  } catch (e) {
    if (e instanceof Unauthorized) {
      main.hidden = true;
      login.hidden = false;
      if (sessionStorage.getItem("dsg-token")) document.getElementById("login-error").textContent = "That token was refused.";
      return;
    }
    live.textContent = "not updating: " + e.message;
    live.classList.add("stale");
    if (e.status === 404 || e.status === 400) main.replaceChildren(el("p", { class: "error", id: "error" }, e.message));
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

login.addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("dsg-token", document.getElementById("token").value.trim());
  refresh();
});

refresh();
