// Small formatting helpers shared by the dashboard modules.

// The server's clock minus ours (ms): countdowns and ages are computed against the server's
// time, so a laptop whose clock is a minute off still shows "retry in 3 s" correctly.
let clockOffsetMs = 0;

export function setServerTime(iso) {
  const t = Date.parse(iso);
  if (!Number.isNaN(t)) clockOffsetMs = t - Date.now();
}

export function serverNow() {
  return Date.now() + clockOffsetMs;
}

export function ts(iso) {
  if (!iso) return null;
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : t;
}

// An id's last 8 characters: its random part. A key begins with its creation time (UUID
// version 7), so the ids of one minute share their first characters.
export function shortId(id) {
  return id ? String(id).slice(-8) : "—";
}

export function fmtDuration(ms) {
  if (ms == null || !Number.isFinite(ms)) return "—";
  if (ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 10_000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const m = Math.floor(ms / 60_000);
  const s = Math.floor((ms % 60_000) / 1000);
  if (m < 60) return `${m}m ${String(s).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  return `${h}h ${String(m % 60).padStart(2, "0")}m`;
}

export function fmtAge(ms) {
  if (ms == null || !Number.isFinite(ms)) return "—";
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h`;
  return `${Math.floor(h / 24)}d`;
}

export function fmtCountdown(ms) {
  if (ms <= 0) return "now";
  const s = Math.ceil(ms / 1000);
  if (s < 60) return `${s}s`;
  return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
}

export function fmtClock(t, { millis = false } = {}) {
  if (t == null) return "—";
  const d = new Date(t);
  const hh = String(d.getUTCHours()).padStart(2, "0");
  const mm = String(d.getUTCMinutes()).padStart(2, "0");
  const ss = String(d.getUTCSeconds()).padStart(2, "0");
  if (!millis) return `${hh}:${mm}:${ss}`;
  return `${hh}:${mm}:${ss}.${String(d.getUTCMilliseconds()).padStart(3, "0")}`;
}

export function fmtNumber(n, digits = 0) {
  if (n == null || !Number.isFinite(n)) return "–";
  return n.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function fmtMs(ms) {
  if (ms == null || !Number.isFinite(ms)) return "–";
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)}s`;
  return fmtDuration(ms);
}

export function human(s) {
  return String(s ?? "").replaceAll("_", " ");
}

// Build an element: h("span", {class: "x", dataset: {state: "running"}}, "text", child...)
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function badge(state, label = state, { small = false } = {}) {
  return h("span", { class: small ? "sbadge small" : "sbadge", dataset: { state } }, human(label));
}
