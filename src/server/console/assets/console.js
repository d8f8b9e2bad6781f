// tollgate console: plain JavaScript, no framework, no build step.
//
// The admin token is kept in sessionStorage (this tab only, gone when it closes) and sent as a
// bearer header to the admin API; never in a URL, never in a cookie. Everything shown comes
// from the API and is put in the page as text (textContent), never as HTML: request ids and
// model names come from clients.
//
// Pages: GET /admin/sections lists the pages this gateway has data for; each id below draws
// one. A section the console does not know yet is shown as its JSON.
"use strict";

const TOKEN = "tollgate-admin-token";
const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";

const PAGES = {
  overview: drawOverview,
  keys: drawKeys,
  groups: drawGroups,
  upstreams: drawUpstreams,
  requests: drawRequests,
};

let sections = [];
let timer = null;
let keyFilter = "";

// === helpers ===

function $(id) {
  return document.getElementById(id);
}

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? String(child) : child);
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  return node;
}

function number(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 2 });
}

// A cost in currency units: up to 6 decimals (the API has the exact figure).
function money(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 6 });
}

function milliseconds(ms) {
  if (ms === null || ms === undefined) return "–";
  return ms >= 1000 ? number(ms / 1000) + " s" : number(ms) + " ms";
}

function percent(ratio) {
  return ratio === null ? "–" : number(ratio * 100) + " %";
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) return s + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}

function clock(date) {
  return date.toTimeString().slice(0, 8);
}

function sum(values) {
  return values.reduce((a, b) => a + (b || 0), 0);
}

class Refused extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN);
  const response = await fetch(path, {
    headers: { Authorization: "Bearer " + token },
    cache: "no-store",
    credentials: "omit",
  });
  if (response.status === 401) throw new Refused("the gateway refused the token (401)");
  if (!response.ok) throw new Error(path + ": " + response.status + " " + response.statusText);
  return response.json();
}

// === sign in, sign out ===

async function signIn(event) {
  event.preventDefault();
  const input = $("token");
  const token = input.value.trim();
  sessionStorage.setItem(TOKEN, token);
  try {
    await start();
    input.value = "";
  } catch (error) {
    signOut(error instanceof Refused ? "The gateway refused this token (401)." : String(error.message || error));
  }
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN);
  clearTimeout(timer);
  $("login").hidden = false;
  $("page").hidden = true;
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("status").textContent = "";
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function start() {
  const answer = await api("/admin/sections");
  sections = answer.sections || [];
  const nav = $("nav");
  nav.replaceChildren(...sections.map((s) => el("a", { href: "#" + s.id, "data-section": s.id }, s.title)));
  $("login").hidden = true;
  $("login-error").textContent = "";
  nav.hidden = false;
  $("sign-out").hidden = false;
  $("page").hidden = false;
  $("status").textContent = "gateway " + (answer.version || "");
  show();
}

// === the current page ===

function current() {
  const id = location.hash.slice(1);
  return sections.find((s) => s.id === id) || sections[0];
}

async function show() {
  clearTimeout(timer);
  const section = current();
  if (!section) return;
  for (const link of $("nav").children) {
    if (link.dataset.section === section.id) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  try {
    const data = await api(section.api);
    if (current() !== section) return;
    const draw = PAGES[section.id] || drawRaw;
    draw($("page"), data, section);
    document.title = section.title + " · tollgate console";
    $("status").textContent = "updated " + clock(new Date());
  } catch (error) {
    if (error instanceof Refused) return signOut("The gateway no longer accepts this token (401).");
    $("status").textContent = "cannot reach the admin API: " + (error.message || error);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function refresh() {
  if (document.hidden) {
    timer = setTimeout(refresh, REFRESH_MS);
    return;
  }
  show();
}

// === Overview ===

function drawOverview(page, stats) {
  const totals = stats.totals;
  const seconds = totals.seconds || stats.requests.length;
  // "Now": the last 10 complete seconds, steadier than the last one alone.
  const recent = (values) => sum(values.slice(-10)) / Math.min(10, values.length || 1);
  const ratio = (part, whole) => (whole > 0 ? part / whole : null);
  const perSecondRatio = (part) => part.map((p, i) => ratio(p, stats.requests[i]));
  const errorRatio = perSecondRatio(stats.errors);
  const refusedRatio = perSecondRatio(stats.refused);

  page.replaceChildren(
    el("h1", {}, "Overview ", el("span", { class: "muted" }, "· last " + duration(seconds))),
    el("div", { class: "figures" },
      figure("Requests", number(totals.requests), "overview-requests"),
      figure("Requests/s now", number(recent(stats.requests)), "overview-rate"),
      figure("Tokens", number(totals.tokens), "overview-tokens"),
      figure("Error ratio (5xx)", percent(ratio(totals.errors, totals.requests)), "overview-errors"),
      figure("Refused (4xx)", percent(ratio(totals.refused, totals.requests)), "overview-refused"),
      figure("Latency p50", milliseconds(totals.p50_ms), "overview-p50"),
      figure("Latency p99", milliseconds(totals.p99_ms), "overview-p99")),
    el("div", { class: "charts" },
      chart("Requests per second", seconds, [{ name: "requests/s", values: stats.requests }], number),
      chart("Tokens per second", seconds, [{ name: "tokens/s", values: stats.tokens }], number),
      chart("Error ratio", seconds, [
        { name: "5xx errors", values: errorRatio },
        { name: "4xx refused", values: refusedRatio, dashed: true },
      ], percent, 1),
      chart("Latency (requests that reached the upstream)", seconds, [
        { name: "p50", values: stats.p50_ms },
        { name: "p99", values: stats.p99_ms, dashed: true },
      ], milliseconds)));
}

function figure(label, value, id) {
  return el("div", { class: "figure" },
    el("div", { class: "label" }, label),
    el("div", { class: "value", id: id }, value));
}

// A line chart of per-second series; gaps (null) break the line. `floor` is the least top of
// the scale (1 for ratios).
function chart(title, seconds, series, format, floor) {
  const width = Math.max(1, seconds - 1);
  let top = floor || 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > top) top = v;
  if (top === 0) top = 1;
  const plot = svg("svg", { viewBox: "0 0 " + width + " 100", preserveAspectRatio: "none", role: "img",
    "aria-label": title + ": " + series.map((s) => s.name + " now " + format(last(s.values))).join(", ") });
  for (const s of series) {
    let d = "";
    const gap = (v) => v === null || v === undefined;
    s.values.forEach((v, i) => {
      if (gap(v)) return;
      const y = (100 - (v / top) * 98).toFixed(2);
      const alone = gap(s.values[i - 1]) && gap(s.values[i + 1]);
      // A point with no neighbour is drawn as a dot (a zero-length line with round caps).
      d += (gap(s.values[i - 1]) ? "M" : "L") + i + " " + y + (alone ? " l0.001 0 " : " ");
    });
    plot.append(svg("path", { d: d || "M0 100", class: s.dashed ? "dashed" : "solid" }));
  }
  return el("figure", { class: "chart" },
    el("figcaption", {},
      el("strong", {}, title),
      el("span", { class: "legend" }, series.map((s) =>
        el("span", { class: s.dashed ? "dashed" : "solid" }, s.name + " " + format(last(s.values)) + " "))),
    ),
    el("div", { class: "plot" },
      el("div", { class: "axis" }, el("span", {}, format(top)), el("span", {}, format(0))),
      plot),
    el("div", { class: "span" }, el("span", {}, "−" + duration(seconds)), el("span", {}, "now")));
}

function last(values) {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null && values[i] !== undefined) return values[i];
  return null;
}

// === Keys ===

function drawKeys(page, data) {
  const keys = data.keys || [];
  const filter = el("input", { type: "search", id: "key-filter", placeholder: "Filter by name", "aria-label": "Filter keys by name" });
  filter.value = keyFilter;
  const cards = el("div", { class: "cards" });
  const fill = () => {
    const wanted = keyFilter.toLowerCase();
    const shown = keys.filter((k) => k.name.toLowerCase().includes(wanted));
    cards.replaceChildren(...shown.map(keyCard));
    count.textContent = shown.length + " of " + keys.length + " keys";
  };
  const count = el("span", { class: "muted" });
  filter.addEventListener("input", () => {
    keyFilter = filter.value;
    fill();
  });
  const hadFocus = document.activeElement && document.activeElement.id === "key-filter";
  page.replaceChildren(el("h1", {}, "Keys"), el("div", { class: "toolbar" }, filter, count), cards);
  fill();
  if (hadFocus) filter.focus();
}

function keyCard(key) {
  const limits = key.limits || {};
  const rate = limits.rate ? number(limits.rate.requests) + " per " + duration(limits.rate.per_seconds) + ", burst " + number(limits.rate.burst) : "none";
  const inflight = number(key.inflight) + (limits.concurrency ? " of " + number(limits.concurrency) : "") + " in flight";
  const rows = [
    ["Models", (limits.models || ["*"]).join(", ")],
    ["Max tokens", limits.max_tokens ? number(limits.max_tokens) : "no cap"],
    ["Rate", rate],
    ["Concurrency", limits.concurrency ? number(limits.concurrency) : "no limit"],
  ];
  if (key.group) rows.unshift(["Group", key.group]);
  const windows = Array.isArray(key.windows) ? key.windows : [];
  return el("article", { class: "card", "data-key": key.name },
    el("header", {}, el("h2", {}, key.name), el("span", { class: "inflight" }, inflight)),
    el("dl", {}, rows.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    windows.length ? windows.map((w) => quotaBar(key.name, w)) : el("p", { class: "muted" },
      key.windows && key.windows.error ? "Quota state unavailable: " + key.windows.error : "No quota of its own."));
}

function quotaBar(name, w) {
  const cost = w.unit === "cost";
  const figure = cost ? money : number;
  const units = cost ? "" : " tokens";
  const reserved = w.reserved || 0;
  const settled = Math.max(0, w.used - reserved);
  const share = (n) => (w.limit > 0 ? Math.min(100, (n / w.limit) * 100) : 0);
  const bar = svg("svg", { class: "bar", viewBox: "0 0 100 10", preserveAspectRatio: "none", role: "meter",
    "aria-valuemin": "0", "aria-valuemax": String(w.limit), "aria-valuenow": String(w.used),
    "aria-label": w.window + " " + (w.unit || "tokens") + " window: " + figure(w.used) + " of " + figure(w.limit) + units });
  bar.append(svg("rect", { class: "used", x: "0", y: "0", height: "10", width: share(settled).toFixed(2) }));
  bar.append(svg("rect", { class: "reserved", x: share(settled).toFixed(2), y: "0", height: "10", width: share(reserved).toFixed(2) }));
  return el("div", { class: "window", "data-window": w.window, "data-unit": w.unit || "tokens", "data-used": w.used, "data-reserved": reserved, "data-limit": w.limit },
    el("div", { class: "line" },
      el("span", {}, el("strong", {}, w.window + (cost ? " cost" : "")), " · " + figure(settled) + " used" + (reserved ? " + " + figure(reserved) + " reserved" : "") + " of " + figure(w.limit) + units),
      el("span", { class: "muted" }, "resets in " + duration(w.reset_seconds))),
    bar);
}

// === Groups ===

function drawGroups(page, data) {
  const groups = data.groups || [];
  page.replaceChildren(
    el("h1", {}, "Groups ", el("span", { class: "muted" }, "· limits their keys share")),
    groups.length === 0 ? el("p", { class: "muted" }, "No group configured.") :
      el("div", { class: "cards" }, groups.map(groupCard)));
}

function groupCard(group) {
  const limits = group.limits || {};
  const rate = limits.rate ? number(limits.rate.requests) + " per " + duration(limits.rate.per_seconds) + ", burst " + number(limits.rate.burst) : "none";
  const inflight = number(group.inflight) + (limits.concurrency ? " of " + number(limits.concurrency) : "") + " in flight";
  const members = group.members || [];
  const rows = [
    ["Keys", members.length ? members.join(", ") : "none"],
    ["Rate", rate],
    ["Concurrency", limits.concurrency ? number(limits.concurrency) : "no limit"],
    ["Currency", limits.currency || "–"],
  ];
  const windows = Array.isArray(group.windows) ? group.windows : [];
  return el("article", { class: "card", "data-group": group.name },
    el("header", {}, el("h2", {}, group.name), el("span", { class: "inflight" }, inflight)),
    el("dl", {}, rows.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    windows.length ? windows.map((w) => quotaBar(group.name, w)) : el("p", { class: "muted" },
      group.windows && group.windows.error ? "Quota state unavailable: " + group.windows.error : "No quota."));
}

// === Upstreams ===

function drawUpstreams(page, data) {
  const pools = data.upstreams || [];
  const columns = ["Endpoint", "URL", "State", "In flight", "Failures", "Ejected until"];
  const numeric = new Set(["In flight", "Failures"]);
  const row = (e) => el("tr", { "data-endpoint": e.endpoint, "data-up": String(e.up) },
    el("td", { class: "mono" }, e.endpoint),
    el("td", { class: "mono" }, e.url),
    el("td", {}, e.up ? "up" : "down"),
    el("td", { class: "num" }, number(e.inflight)),
    el("td", { class: "num" }, number(e.failures)),
    el("td", {}, e.ejected_until ? clock(new Date(e.ejected_until)) : "—"));
  const pool = (p) => el("section", { class: "pool", "data-pool": p.name },
    el("h2", {}, p.name, " ", el("span", { class: "muted" }, "· " + p.balance + " · models " + p.models.join(", "))),
    el("div", { class: "scroll" }, el("table", {},
      el("thead", {}, el("tr", {}, columns.map((c) => el("th", { class: numeric.has(c) ? "num" : null, scope: "col" }, c)))),
      el("tbody", {}, p.endpoints.map(row)))));
  const up = pools.reduce((n, p) => n + p.endpoints.filter((e) => e.up).length, 0);
  const all = pools.reduce((n, p) => n + p.endpoints.length, 0);
  page.replaceChildren(
    el("h1", {}, "Upstreams ", el("span", { class: "muted" }, "· " + up + " of " + all + " endpoints up")),
    ...pools.map(pool));
}

// === Recent requests ===

function drawRequests(page, data) {
  const requests = data.requests || [];
  const columns = ["Time", "Key", "Group", "Model", "Endpoint", "Status", "Prompt", "Completion", "Cost", "Tokens from", "Duration", "First token", "Outcome", "Request id"];
  const numeric = new Set(["Status", "Prompt", "Completion", "Cost", "Duration", "First token"]);
  const row = (r) => el("tr", {},
    el("td", {}, clock(new Date(r.time))),
    el("td", {}, r.key),
    el("td", {}, r.group || "–"),
    el("td", {}, r.model),
    el("td", {}, r.endpoint),
    el("td", { class: "num" }, r.status),
    el("td", { class: "num" }, number(r.prompt_tokens)),
    el("td", { class: "num" }, number(r.completion_tokens)),
    el("td", { class: "num" }, money(r.cost)),
    el("td", {}, r.source),
    el("td", { class: "num" }, milliseconds(r.duration_ms)),
    el("td", { class: "num" }, milliseconds(r.ttft_ms)),
    el("td", {}, r.outcome),
    el("td", { class: "mono" }, r.request_id));
  page.replaceChildren(
    el("h1", {}, "Recent requests ", el("span", { class: "muted" }, "· the last " + requests.length + " the ledger recorded, newest first")),
    requests.length === 0 ? el("p", { class: "muted" }, "No finished request yet.") :
      el("div", { class: "scroll" }, el("table", { id: "requests" },
        el("thead", {}, el("tr", {}, columns.map((c) => el("th", { class: numeric.has(c) ? "num" : null, scope: "col" }, c)))),
        el("tbody", {}, requests.map(row)))));
}

// === a section this console does not know yet ===

function drawRaw(page, data, section) {
  page.replaceChildren(el("h1", {}, section.title), el("pre", {}, JSON.stringify(data, null, 2)));
}

// === start ===

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut(""));
  window.addEventListener("hashchange", show);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && sessionStorage.getItem(TOKEN)) show();
  });
  if (sessionStorage.getItem(TOKEN)) {
    start().catch((error) => signOut(error instanceof Refused ? "" : String(error.message || error)));
  } else {
    $("token").focus();
  }
});
