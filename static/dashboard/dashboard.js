// Operator dashboard: the live view of every saga (docs/LIVE_FEED.md).
//
// Messages are buffered as they arrive and applied once per animation frame, so a burst of a
// thousand headers costs one list redraw, not a thousand. The watched saga's events carry a
// sequence number: a gap (a message the channel layer dropped) makes the page ask for the saga
// again, and a reconnect re-watches it, so what is on screen converges on the database.

import { BulkActions } from "./bulk.js";
import { OUTCOME_SERIES, outcomeBars, sparkline } from "./charts.js";
import { Feed } from "./feed.js";
import { badge, fmtClock, fmtCountdown, fmtDuration, fmtMs, fmtNumber, h, human, serverNow, setServerTime, shortId, ts } from "./format.js";
import { SagaList, isRetrying } from "./list.js";
import { Inspector } from "./inspect.js";
import { renderOps } from "./ops.js";
import { PlatformGraph } from "./platform.js";
import { renderInstances } from "./registry.js";
import { STATE_COLORS, SagaGraph, statusLine } from "./sagagraph.js";
import { SearchPanel } from "./search.js";
import { initTheme } from "./theme.js";

const $ = (id) => document.getElementById(id);
const root = $("dashboard");

const MAX_HEADERS = 5000;
const HISTORY = 450; // overview samples kept for the sparklines (15 min at one per 2 s)
const TERMINAL = new Set(["completed", "compensated", "failed", "cancelled"]);

const state = {
  user: null,
  canOperate: root.dataset.canOperate === "true",
  definitions: {},
  sagas: new Map(),
  selectedId: null,
  watched: null, // {id, header, steps: Map, events: [], lastSeq, loaded}
  overview: null,
  history: [],
  conn: "connecting",
  pending: new Map(),
  toasts: [],
  // messages/frames applied, gaps healed; frameMs: what applying and drawing a frame cost
  // (moving average and worst); lagMs: from the server sending a message to the frame that
  // applied it (same machine only: it compares two clocks).
  stats: { messages: 0, frames: 0, gaps: 0, rewatches: 0, snapshots: 0, frameMs: 0, maxFrameMs: 0, lagMs: 0 },
};

// --- feed and frame loop --------------------------------------------------------------------

const inbox = [];
let frameRequested = false;
let fallbackTimer = null;
let snapshotTimer = null;
let rewatchTimer = null;
let lastWatchSent = 0;

const feed = new Feed(root.dataset.wsPath || "/ws/dashboard/", {
  onMessage(msg) {
    state.stats.messages += 1;
    inbox.push(msg);
    scheduleFrame();
  },
  onStatus: setConnection,
  onOpen(reconnected) {
    // The server sends hello + snapshot + overview on connect. If the snapshot does not come
    // (an older server, a dropped frame), ask for it: the list must start from the database.
    clearTimeout(snapshotTimer);
    state.snapshotSeen = false;
    snapshotTimer = setTimeout(() => {
      if (!state.snapshotSeen) feed.send({ action: "snapshot" });
    }, 2000);
    if (state.selectedId) sendWatch(state.selectedId, { force: true });
    // Say so only when the operator could have noticed the gap (a blip heals silently).
    if (reconnected && state.offlineSince && Date.now() - state.offlineSince > 3000) {
      toast("Reconnected", "Back live; the list and the selected saga were reloaded.", "ok");
    }
    state.offlineSince = null;
    // An answer that was due on the old socket will never come: say so rather than wait.
    for (const [id, p] of state.pending) {
      state.pending.delete(id);
      toast(`${capitalise(p.kind)}: no answer`, `Saga ${shortId(p.saga)}: the connection dropped before the answer came; the timeline shows whether it was done.`, "err");
    }
  },
});

function scheduleFrame() {
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(frame);
  // A hidden tab gets no animation frames: apply anyway, less often, so the buffer stays small.
  fallbackTimer = setTimeout(() => frameRequested && frame(), 500);
}

function frame() {
  frameRequested = false;
  clearTimeout(fallbackTimer);
  const batch = inbox.splice(0);
  if (!batch.length) return;
  const began = performance.now();
  const dirty = { list: false, saga: false, overview: false, timeline: false };
  const applied = [];
  for (const msg of batch) {
    try {
      apply(msg, dirty, applied);
    } catch (err) {
      console.error("dashboard: could not apply", msg.type, err);
    }
  }
  render(dirty);
  const stats = state.stats;
  const cost = performance.now() - began;
  stats.frames += 1;
  stats.frameMs = stats.frameMs ? 0.9 * stats.frameMs + 0.1 * cost : cost;
  stats.maxFrameMs = Math.max(stats.maxFrameMs, cost);
  const sent = batch[batch.length - 1].sent_at;
  if (sent) stats.lagMs = Date.now() - sent;
  if (applied.length && typeof window.__onFeedApplied === "function") {
    try {
      window.__onFeedApplied(applied, Date.now(), state.selectedId);
    } catch (err) {
      console.error(err);
    }
  }
}

function mergeHeader(header) {
  const old = state.sagas.get(header.id);
  if (old && (old.version ?? 0) > (header.version ?? 0)) return old; // an older copy arrived late
  state.sagas.set(header.id, header);
  return header;
}

function apply(msg, dirty, applied) {
  switch (msg.type) {
    case "hello":
      state.user = msg.user;
      if (state.canOperate !== !!msg.can_operate) setSelectable(!!msg.can_operate);
      state.canOperate = !!msg.can_operate;
      state.definitions = msg.definitions || {};
      if (msg.server_time) setServerTime(msg.server_time);
      $("clock").textContent = `${fmtClock(serverNow())} UTC`;
      dirty.saga = true;
      break;
    case "snapshot": {
      state.snapshotSeen = true;
      state.stats.snapshots += 1;
      const next = new Map();
      for (const header of msg.sagas || []) next.set(header.id, header);
      // The watched saga may be older than the snapshot's window: keep it.
      const w = state.watched?.header;
      if (w && !next.has(w.id)) next.set(w.id, w);
      state.sagas = next;
      dirty.list = true;
      dirty.saga = true;
      break;
    }
    case "sagas":
      for (const header of msg.sagas || []) {
        if (msg.sent_at != null && header.sent_at == null) header.sent_at = msg.sent_at;
        const kept = mergeHeader(header);
        applied.push(header);
        if (state.watched && header.id === state.watched.id && kept === header) {
          state.watched.header = header;
          dirty.saga = true;
          // Selected before it existed (the watch was refused): now it does, watch it.
          if (!state.watched.loaded) requestWatch("the saga appeared");
          else expectEvents(header.version);
        }
      }
      if (search.onHeaders(msg.sagas || [])) dirty.list = true;
      dirty.list = true;
      prune();
      break;
    case "saga":
      applySaga(msg, dirty, applied);
      break;
    case "overview":
      state.overview = msg;
      if (msg.now) setServerTime(msg.now);
      state.history.push({
        t: Date.now(),
        in_flight: msg.in_flight,
        p50: msg.latency_ms?.p50,
        p95: msg.latency_ms?.p95,
        p99: msg.latency_ms?.p99,
        throughput: msg.throughput_per_min,
      });
      if (state.history.length > HISTORY) state.history.splice(0, state.history.length - HISTORY);
      dirty.overview = true;
      break;
    case "action_result":
      settleAction(msg);
      break;
    case "error":
      if (msg.code === "not_found" && state.watched && !state.watched.loaded) {
        // A saga selected right after its order was placed may not exist yet: ask again soon.
        state.watched.missing = (state.watched.missing || 0) + 1;
        if (state.watched.missing <= 20) setTimeout(() => state.watched && !state.watched.loaded && requestWatch("not yet there"), 500);
        dirty.saga = true;
        break;
      }
      toast("The server refused a message", `${msg.code || "error"}: ${msg.message || ""}`, "err");
      break;
    default:
      break;
  }
}

function applySaga(msg, dirty, applied) {
  const header = msg.saga;
  if (!header || header.id !== state.selectedId) return; // an answer about a saga no longer selected
  if (msg.sent_at != null && header.sent_at == null) header.sent_at = msg.sent_at;
  applied.push(header);
  mergeHeader(header);
  search.onHeaders([header]);
  dirty.list = true;
  dirty.saga = true;
  const events = [...(msg.events || [])].sort((a, b) => a.seq - b.seq);
  if (msg.full || !state.watched || !state.watched.loaded) {
    state.watched = {
      id: header.id,
      header,
      steps: new Map((msg.steps || []).map((s) => [s.name, s])),
      events,
      lastSeq: events.length ? events[events.length - 1].seq : header.version ?? 0,
      loaded: true,
      rendered: 0,
    };
    dirty.timeline = "full";
    if (!msg.full) requestWatch("a change arrived before the saga itself");
    return;
  }
  const w = state.watched;
  if ((header.version ?? 0) >= (w.header.version ?? 0)) w.header = header;
  for (const step of msg.steps || []) w.steps.set(step.name, step);
  const fresh = events.filter((e) => e.seq > w.lastSeq);
  // Every event after lastSeq must follow without a hole, inside this message too: a saga's
  // events come from several worker processes, each publisher batching what it committed, so one
  // message may carry 16 and 18 while 17 is still on its way from another process (it would
  // then arrive behind lastSeq and be dropped). A hole, or something lost: take a fresh copy.
  const hole = fresh.findIndex((e, i) => e.seq !== (i ? fresh[i - 1].seq : w.lastSeq) + 1);
  if (hole >= 0) {
    state.stats.gaps += 1;
    requestWatch(`gap: had ${hole ? fresh[hole - 1].seq : w.lastSeq}, got ${fresh[hole].seq}`);
  }
  for (const e of fresh) {
    w.events.push(e);
    w.lastSeq = e.seq;
  }
  if (fresh.length) dirty.timeline = dirty.timeline || "append";
}

// A header newer than the events we hold means a `saga` message is due; if it does not come,
// it was dropped, so ask again.
function expectEvents(version) {
  const w = state.watched;
  if (!w || !w.loaded || (version ?? 0) <= w.lastSeq) return;
  clearTimeout(rewatchTimer);
  rewatchTimer = setTimeout(() => {
    const cur = state.watched;
    if (cur && cur.id === w.id && cur.lastSeq < version) {
      state.stats.gaps += 1;
      requestWatch(`header at ${version}, events at ${cur.lastSeq}`);
    }
  }, 1500);
}

function requestWatch(why) {
  if (!state.selectedId) return;
  state.stats.rewatches += 1;
  sendWatch(state.selectedId, { why });
}

function sendWatch(id, { force = false } = {}) {
  const now = Date.now();
  if (!force && now - lastWatchSent < 800) {
    // Rate-limited: one fresh copy is enough for a burst of gaps.
    clearTimeout(sendWatch.later);
    sendWatch.later = setTimeout(() => sendWatch(state.selectedId, { force: true }), 800);
    return;
  }
  lastWatchSent = now;
  feed.send({ action: "watch", saga: id });
}

function prune() {
  if (state.sagas.size <= MAX_HEADERS) return;
  const finished = [...state.sagas.values()]
    .filter((s) => TERMINAL.has(s.state) && s.id !== state.selectedId)
    .sort((a, b) => (a.created_at || "").localeCompare(b.created_at || ""));
  for (const s of finished.slice(0, state.sagas.size - MAX_HEADERS)) state.sagas.delete(s.id);
}

// --- rendering ----------------------------------------------------------------------------------

const list = new SagaList(
  {
    list: $("saga-list"),
    chips: $("state-filters"),
    search: $("search"),
    style: $("filter-style"),
    age: $("filter-age"),
    count: $("list-count"),
    empty: $("list-empty"),
    more: $("list-more"),
  },
  { onSelect: selectSaga, getContext: () => ({ watched: state.watched }) },
);
list.onChange = () => render({ list: true });
list.selectable = state.canOperate;

function setSelectable(on) {
  // Rows are built once: rebuild them with (or without) their checkbox.
  list.selectable = on;
  for (const row of list.rows.values()) row.li.remove();
  list.rows.clear();
  list.order = [];
  bulk.render();
}

// Same-origin JSON calls to the operator API (the session cookie and its CSRF token).
async function api(path, body, method = "POST") {
  try {
    const response = await fetch(path, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": root.dataset.csrf || "" },
      body: body == null ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    return { ok: response.ok, status: response.status, body: text ? JSON.parse(text) : null };
  } catch (err) {
    return { ok: false, status: 0, body: { code: "network", message: `The server did not answer (${err.message || err}).` } };
  }
}

// Bad filters (in the URL, or refused by the search): a notice above the list, never a blank.
function showNotice(details, title = "These filters cannot be used:") {
  const notice = $("notice");
  if (!details) {
    notice.hidden = true;
    return;
  }
  notice.querySelector("b").textContent = title;
  $("notice-list").replaceChildren(...Object.entries(details).map(([name, errors]) => h("li", {}, h("code", {}, name), `: ${[].concat(errors).map((e) => (typeof e === "object" ? JSON.stringify(e) : e)).join(" ")}`)));
  notice.hidden = false;
}

const search = new SearchPanel(root, {
  api,
  onNotice: showNotice,
  onResults() {
    list.fixed = search.active ? search.order : null;
    render({ list: true });
    bulk.render();
  },
});
const bulk = new BulkActions(root, { list, search, api, toast: (...args) => toast(...args), canOperate: () => state.canOperate });
list.onPickChange = () => bulk.render();
const inspector = new Inspector(root);
inspector.onClose = () => graph.pick(null);

const graph = new SagaGraph($("saga-graph"), { onPick: (name) => renderPicked(name) });
const platform = new PlatformGraph($("platform-graph"));

// The transaction flow is drawn small in its panel; expanded, it covers the page and every
// label is read at full size (the graph refits to its container on resize).
function expandFlow(on) {
  $("flow-block").classList.toggle("expanded", on);
  $("flow-expand").setAttribute("aria-expanded", String(on));
  $("flow-expand").textContent = on ? "Close" : "Expand";
  $("flow-expand").setAttribute("aria-label", on ? "Close the expanded transaction flow" : "Expand the transaction flow");
}
$("flow-expand").addEventListener("click", () => expandFlow(!$("flow-block").classList.contains("expanded")));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && $("flow-block").classList.contains("expanded")) expandFlow(false);
});

function render(dirty) {
  if (dirty.list) {
    list.render(search.active ? search.headers : state.sagas);
    renderAttention();
  }
  if (dirty.saga || dirty.timeline) renderSaga(dirty.timeline);
  if (dirty.overview) renderOverview();
}

function renderAttention() {
  let parked = 0;
  let stuck = 0;
  for (const s of state.sagas.values()) {
    if (s.state === "parked") parked += 1;
    else if (s.stuck) stuck += 1;
  }
  const tile = $("kpi-attention");
  tile.querySelector('[data-field="value"]').textContent = fmtNumber(parked + stuck);
  tile.querySelector('[data-field="sub"]').textContent = `${parked} parked · ${stuck} stuck`;
  tile.classList.toggle("alert", parked + stuck > 0);
}

function definitionFor(header, steps) {
  // A saga runs the version it started on: an older one comes with its own graph.
  if (header?.definition_graph) return header.definition_graph;
  const def = state.definitions[header?.definition];
  if (def && (!header?.definition_hash || def.digest === header.definition_hash)) return def;
  // Not in hello (an older definition): draw the steps as a chain, which is what they were.
  const actions = [...steps.values()].filter((s) => s.kind !== "on_failure").sort((a, b) => a.position - b.position);
  const failure = [...steps.values()].filter((s) => s.kind === "on_failure").sort((a, b) => a.position - b.position);
  const chain = (arr) => arr.map((s, i) => ({ name: s.name, service: s.service, after: i ? [arr[i - 1].name] : [], pivot: false, compensation: null }));
  return { name: `?${header?.definition}`, digest: header?.definition_hash, style: header?.style, steps: chain(actions), on_failure: chain(failure) };
}

function renderSaga(timelineMode) {
  const w = state.watched;
  const empty = !state.selectedId;
  $("saga-empty").hidden = !empty;
  $("saga-detail").hidden = empty;
  if (empty) return;
  const header = w?.header || state.sagas.get(state.selectedId);
  const steps = w?.steps || new Map();
  if (!header) {
    $("saga-id").textContent = state.selectedId;
    setBadge($("saga-state"), "pending", w?.missing > 20 ? "not found" : "loading…");
    $("saga-meta").replaceChildren();
    $("saga-failure").hidden = true;
    $("saga-parked").hidden = true;
    graph.setDefinition(null);
    renderTimeline("full");
    return;
  }
  $("saga-id").textContent = header.id;
  $("export-json").href = `/api/sagas/${header.id}/export/?download=1`;
  setBadge($("saga-state"), header.state);
  renderMeta(header);
  const failure = $("saga-failure");
  failure.hidden = !header.failure;
  if (header.failure) {
    failure.replaceChildren(h("b", {}, header.failure.code || "failure"), " ", header.failure.message || "");
  }
  // A parked saga waits for a person: say why, in the engine's words, next to the buttons.
  const parked = $("saga-parked");
  const why = header.state === "parked" ? [...(w?.events || [])].reverse().find((e) => e.kind === "saga_parked") : null;
  parked.hidden = header.state !== "parked";
  if (header.state === "parked") {
    parked.replaceChildren(h("b", {}, "Parked, waiting for an operator. "), why?.data?.message || "A step keeps failing; retry it once fixed, or skip the compensation with a reason.");
  }
  // Until the saga's steps arrive the graph shows its definition with every step pending,
  // never the previous saga's states.
  graph.setDefinition(definitionFor(header, steps));
  graph.update(header, steps);
  describeSteps(header, steps);
  renderActions(header);
  if (timelineMode) renderTimeline(timelineMode);
  if (graph.picked) renderPicked(graph.picked);
}

function setBadge(el, st, label = st) {
  el.dataset.state = st;
  el.textContent = human(label);
}

function renderMeta(header) {
  const now = serverNow();
  const created = ts(header.created_at);
  const finished = ts(header.finished_at);
  const items = [
    ["Order", header.order_id ? h("code", { title: header.order_id }, header.order_id) : "—"],
    ["Style", header.style || "—"],
    ["Definition", header.definition || "—"],
    ["Version", header.definition_version ? h("span", { title: header.definition_hash || "" }, header.definition_version) : "—"],
    ["Started", created ? fmtClock(created) : "—"],
    [finished ? "Took" : "Running for", created ? fmtDuration((finished ?? now) - created) : "—"],
    ["Progress", `${header.steps_done ?? 0}/${header.steps_total ?? 0}${header.active_step ? ` · ${header.active_step}` : ""}`],
    // The saga row's optimistic-lock version: how many changes the engine has committed to it.
    ["Revision", h("span", { title: "Changes committed to this saga (its row version)" }, String(header.version ?? "—"))],
  ];
  const trace = traceOf(state.watched);
  if (trace) items.push(["Trace", traceLink(trace)]);
  if (header.stuck && header.state !== "parked") items.push(["Flag", badge("stuck")]);
  if (isRetrying(header, state.watched)) items.push(["Flag", badge("retrying")]);
  $("saga-meta").replaceChildren(...items.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v))));
}

// The trace id is stamped on the saga's first event when tracing is on (docs/OPERATIONS.md);
// kept once seen, since the timeline drops its oldest rows.
function traceOf(w) {
  if (!w) return null;
  if (!w.traceId) w.traceId = (w.events || []).find((e) => e.seq === 1)?.data?.trace_id || null;
  return w.traceId;
}

function traceLink(traceId) {
  const template = root.dataset.traceUrl;
  const code = h("code", { title: traceId }, traceId);
  if (!template) return code;
  return h("a", { href: template.replace("{trace_id}", encodeURIComponent(traceId)), target: "_blank", rel: "noopener" }, code);
}

// Screen readers get the graph as text: one line per step.
function describeSteps(header, steps) {
  const def = graph.definition;
  if (!def) return;
  const lines = [...def.steps, ...(def.on_failure || [])].map((s) => `${s.name}${s.pivot ? " (pivot)" : ""}: ${statusLine(steps.get(s.name))}`);
  $("graph-steps").textContent = lines.join(". ");
}

// What the operator may do now, and why not otherwise: the server's answer, sent with each saga
// (`actions`, from orchestration/rules.py), never derived here. An allowed cancel with `until`
// turns into its `then` refusal at that time (a pivot about to start), with no message to say so.
function allowedActions(header) {
  const out = {};
  for (const kind of ["cancel", "retry", "skip"]) {
    const a = header.actions?.[kind];
    if (!a) {
      out[kind] = { ok: false, why: "Waiting for the server's answer", steps: [] };
      continue;
    }
    const expired = a.allowed && a.until && serverNow() >= ts(a.until);
    out[kind] = { ok: a.allowed && !expired, why: expired ? a.then?.message || a.message : a.message, steps: a.steps || [] };
  }
  return out;
}

function renderActions(header) {
  const allowed = allowedActions(header);
  const loaded = !!state.watched?.loaded;
  for (const kind of ["cancel", "retry", "skip"]) {
    const btn = $(`act-${kind}`);
    const a = allowed[kind];
    const busy = [...state.pending.values()].some((p) => p.saga === header.id && p.kind === kind);
    btn.disabled = !state.canOperate || !loaded || !a.ok || busy;
    btn.title = state.canOperate ? a.why : "You may watch but not operate sagas (orchestration.operate_saga)";
  }
  const hint = $("action-hint");
  const pending = [...state.pending.values()].filter((p) => p.saga === header.id);
  hint.textContent = !state.canOperate
    ? "Read-only: you lack the permission to operate sagas."
    : pending.length
      ? `Waiting for the answer to ${pending.map((p) => p.kind).join(", ")}…`
      : "";
}

const KIND_LABELS = {
  saga_created: "created",
  saga_started: "started",
  step_started: "step started",
  step_scheduled: "step scheduled",
  step_succeeded: "step succeeded",
  step_failed: "step failed",
  retry_scheduled: "retry scheduled",
  step_timed_out: "timed out",
  compensation_started: "compensation started",
  compensation_retry_scheduled: "compensation retry",
  step_compensated: "compensated",
  compensation_failed: "compensation gave up",
  compensation_skipped: "compensation skipped",
  saga_compensating: "compensating",
  saga_compensated: "compensated",
  saga_completed: "completed",
  saga_failed: "failed",
  saga_parked: "parked",
  saga_cancel_requested: "cancel requested",
  saga_cancelled: "cancelled",
  operator_retry: "operator retry",
  saga_resumed: "resumed",
  saga_confirming: "confirming",
  confirm_started: "confirm started",
  step_confirmed: "confirmed",
  confirm_retry_scheduled: "confirm retry",
  confirm_failed: "confirm gave up",
  deadline_passed_after_pivot: "deadline passed (after pivot)",
};

const SAGA_COLORS = {
  running: "#4f8dff",
  confirming: "#2ed3c0",
  compensating: "#c58cff",
  completed: "#2fc26b",
  compensated: "#9a6bff",
  failed: "#f0524f",
  parked: "#ff8a3d",
  cancelled: "#9aa7c0",
};

const FAILURE_KINDS = /failed|timed_out|parked|gave_up|retry_scheduled|refused|missing/;

const MAX_TIMELINE_ROWS = 300;
let followScroll = null;

function renderTimeline(mode) {
  const w = state.watched;
  const tbody = $("timeline").tBodies[0];
  if (!w) {
    tbody.replaceChildren();
    return;
  }
  if (mode === "full") {
    tbody.replaceChildren();
    w.rendered = 0;
  }
  const start = ts(w.header?.created_at) ?? ts(w.events[0]?.created_at);
  const fresh = w.events.slice(Math.max(w.rendered, w.events.length - MAX_TIMELINE_ROWS));
  const frag = document.createDocumentFragment();
  const picked = graph.picked;
  fresh.forEach((ev, i) => {
    // Only the last few flash: a burst of a hundred flashing rows is noise, not news.
    const row = eventRow(ev, start, mode !== "full" && i >= fresh.length - 20);
    row.hidden = !!picked && row.dataset.step !== picked;
    frag.append(row);
  });
  w.rendered = w.events.length;
  tbody.append(frag);
  // Keep the DOM bounded under a burst: the oldest rows go (the database keeps them all).
  for (let extra = tbody.rows.length - MAX_TIMELINE_ROWS; extra > 0; extra -= 1) tbody.firstElementChild.remove();
  if (w.events.length > MAX_TIMELINE_ROWS * 2) w.events.splice(0, w.events.length - MAX_TIMELINE_ROWS);
  w.rendered = w.events.length;
  // Follow the newest event in the next frame, when the layout is clean again: measuring it
  // here, after this frame's list changes, would force a layout of the whole page.
  if ($("follow").checked && fresh.length && !followScroll) {
    followScroll = requestAnimationFrame(() => {
      followScroll = null;
      const wrap = $("timeline-wrap");
      wrap.scrollTop = wrap.scrollHeight;
    });
  }
}

// Who acted: the platform's own processes, or a person (an operator, a customer).
const SYSTEM_ACTORS = new Set(["", "engine", "tracker", "sweeper", "system"]);

function eventRow(ev, start, fresh) {
  const at = ts(ev.created_at);
  const person = !SYSTEM_ACTORS.has(ev.actor || "");
  const cls = [fresh ? "new" : "", FAILURE_KINDS.test(ev.kind) ? "failure" : "", person ? "operator" : ""].filter(Boolean).join(" ");
  const label = KIND_LABELS[ev.kind] || human(ev.kind);
  const stateColor = STATE_COLORS[ev.to_state] || SAGA_COLORS[ev.to_state];
  const transition = ev.from_state && ev.from_state !== ev.to_state ? `${human(ev.from_state)} → ${human(ev.to_state)}` : human(ev.to_state);
  return h(
    "tr",
    { class: cls, tabindex: ev.step ? "0" : null, title: ev.step ? "Show this step's input, result and attempts" : null, dataset: { step: ev.step || "", seq: ev.seq, kind: ev.kind } },
    h(
      "td",
      { class: "t", title: `${ev.created_at} · event ${ev.seq}` },
      fmtClock(at, { millis: true }),
      h("small", {}, start != null && at != null ? `+${fmtMs(at - start)}` : ""),
    ),
    h("td", { class: "tl-step" }, ev.step || h("span", { class: "saga-level" }, "saga")),
    h("td", { class: "kind" }, h("span", { style: stateColor ? `color: ${stateColor}` : null }, label), h("small", {}, transition)),
    h("td", { class: "details" }, ...eventDetails(ev)),
    h("td", { class: person ? "actor op" : "actor" }, ev.actor || ""),
  );
}

function eventDetails(ev) {
  const d = ev.data || {};
  const out = [];
  const sep = () => out.length && out.push(" · ");
  if (d.attempt != null) {
    sep();
    out.push(`attempt ${d.attempt}${d.op && d.op !== "action" ? ` (${d.op})` : ""}`);
  }
  const error = d.error || d.failure;
  if (error && (error.code || error.message)) {
    sep();
    out.push(h("span", { class: "err" }, `${error.code || "error"}${error.message ? `: ${error.message}` : ""}`));
  }
  if (d.delay != null) {
    sep();
    out.push(`retry in ${fmtDuration(d.delay * 1000)}`);
  }
  if (d.starts_in != null) {
    sep();
    out.push(`starts in ${fmtDuration(d.starts_in * 1000)}`);
  }
  if (d.reason) {
    sep();
    out.push(h("span", { class: "reason" }, `“${d.reason}”`));
  }
  if (d.message) {
    sep();
    out.push(d.message);
  }
  if (d.steps?.length) {
    sep();
    out.push(`steps: ${d.steps.join(", ")}`);
  }
  if (d.by) {
    sep();
    out.push(`by ${d.by}`);
  }
  if (d.replayed) {
    sep();
    out.push("replayed by the barrier");
  }
  if (d.barrier) {
    sep();
    out.push(human(d.barrier));
  }
  if (d.definition && ev.kind === "saga_created") {
    sep();
    out.push(d.definition);
  }
  return out;
}

function applyTimelineFilter() {
  const step = graph.picked;
  for (const tr of $("timeline").tBodies[0].rows) tr.hidden = !!step && tr.dataset.step !== step;
  const label = $("timeline-filter");
  label.hidden = !step;
  if (step) {
    label.replaceChildren(`only ${step} · `, h("button", { type: "button", onclick: () => graph.pick(null) }, "show all"));
  }
}

function renderPicked(name) {
  applyTimelineFilter();
  inspector.show(name ? state.selectedId : null, name, state.watched?.header?.version ?? 0);
  const card = $("step-card");
  const w = state.watched;
  const step = name && w?.steps.get(name);
  const spec = name && graph.definition && [...graph.definition.steps, ...(graph.definition.on_failure || [])].find((s) => s.name === name);
  if (!name || !spec) {
    card.hidden = true;
    return;
  }
  const now = serverNow();
  const rows = [
    ["Service", spec.service],
    ["State", badge(step?.state || "pending")],
    ["Attempts", String(step?.attempts ?? 0)],
  ];
  if (spec.compensation) rows.push(["Compensation", `${spec.compensation}${step?.compensation_attempts ? ` · ${step.compensation_attempts} tries` : ""}`]);
  if (spec.confirm) rows.push(["Confirm", `${spec.confirm}${step?.confirm_attempts ? ` · ${step.confirm_attempts} tries` : ""}`]);
  if (step?.started_at) rows.push(["Started", fmtClock(ts(step.started_at), { millis: true })]);
  if (step?.finished_at) rows.push(["Finished", fmtClock(ts(step.finished_at), { millis: true })]);
  if (step?.started_at) rows.push(["Duration", fmtDuration((ts(step.finished_at) ?? now) - ts(step.started_at))]);
  if (step?.next_attempt_at) rows.push(["Next attempt", `in ${fmtCountdown(ts(step.next_attempt_at) - now)}`]);
  if (step?.deadline_at) rows.push(["Lease ends", fmtClock(ts(step.deadline_at))]);
  if (step?.error) rows.push(["Error", h("span", { class: "err" }, `${step.error.code}: ${step.error.message || ""}`)]);
  if (spec.pivot) rows.push(["Pivot", "the point of no return"]);
  card.replaceChildren(
    h("h4", {}, spec.name, spec.pivot ? h("span", { class: "tag" }, "pivot") : null),
    h("dl", {}, ...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
  );
  card.hidden = false;
}

function renderOverview() {
  const o = state.overview;
  if (!o) return;
  const minutes = o.minutes || [];
  const series = (key) => minutes.map((m) => m[key] || 0);
  const last = minutes[minutes.length - 1] || {};
  const prev = minutes[minutes.length - 2] || {};
  const setTile = (id, value, sub) => {
    const tile = $(id);
    tile.querySelector('[data-field="value"]').textContent = value;
    tile.querySelector('[data-field="sub"]').textContent = sub;
  };
  const byState = Object.entries(o.by_state || {})
    .filter(([k, v]) => v && !TERMINAL.has(k))
    .sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `${v} ${human(k)}`)
    .join(" · ");
  setTile("kpi-inflight", fmtNumber(o.in_flight), byState || "nothing running");
  const sum = (key) => series(key).reduce((a, b) => a + b, 0);
  setTile("kpi-started", fmtNumber(last.started ?? 0), `${fmtNumber(prev.started ?? 0)} last minute · ${fmtNumber(sum("started") / Math.max(1, minutes.length), 1)}/min avg`);
  setTile("kpi-throughput", fmtNumber(o.throughput_per_min, 1), `${fmtNumber(last.completed ?? 0)} completed this minute`);
  setTile("kpi-compensated", fmtNumber(last.compensated ?? 0), `${fmtNumber(sum("compensated"))} in 15 min · ${fmtNumber(sum("failed") + sum("cancelled"))} failed/cancelled`);
  const lat = o.latency_ms || {};
  const latTile = $("kpi-latency");
  latTile.querySelector('[data-field="p50"]').textContent = fmtMs(lat.p50);
  latTile.querySelector('[data-field="p95"]').textContent = fmtMs(lat.p95);
  latTile.querySelector('[data-field="p99"]').textContent = fmtMs(lat.p99);
  latTile.querySelector('[data-field="sub"]').textContent = lat.count ? `over ${fmtNumber(lat.count)} sagas finished · p95 trend` : "no saga finished in the last 5 min";

  const hist = state.history;
  sparkline(document.querySelector('[data-spark="in_flight"]'), hist.map((s) => s.in_flight), { color: "#4f8dff" });
  sparkline(document.querySelector('[data-spark="started"]'), series("started"), { color: "#7aa7ff" });
  sparkline(document.querySelector('[data-spark="completed"]'), series("completed"), { color: "#2fc26b" });
  sparkline(document.querySelector('[data-spark="compensated"]'), series("compensated"), { color: "#9a6bff" });
  sparkline(document.querySelector('[data-spark="parked"]'), series("parked"), { color: "#ff8a3d" });
  sparkline(document.querySelector('[data-spark="p95"]'), hist.map((s) => s.p95 ?? null).filter((v) => v != null), { color: "#f5a524" });

  outcomeBars($("outcomes-chart"), minutes);
  renderQueues(o.queues || {}, o.workers || [], o.dead_letters);
  renderInstances(o.instances || []);
  renderOps(o); // alerts and stock contention (ops.js)
  platform.update(o.flow, o.queues || {}, o.workers || [], o.breakers || {});
  const total = (o.flow?.edges || []).reduce((s, e) => s + (e.per_min || 0), 0);
  const failing = (o.flow?.edges || []).reduce((s, e) => s + (e.failures_per_min || 0), 0);
  $("flow-total").textContent = `${fmtNumber(total, 1)} msg/min${failing ? ` · ${fmtNumber(failing, 1)} failing` : ""}`;
}

function renderQueues(queues, workers, deadLetters) {
  const names = Object.keys(queues);
  for (const w of workers) for (const q of w.queues || []) if (!names.includes(q)) names.push(q);
  const max = Math.max(10, ...Object.values(queues));
  const items = names.map((q) => {
    const serving = workers.filter((w) => (w.queues || []).includes(q));
    const alive = serving.filter((w) => w.alive);
    const depth = queues[q] ?? 0;
    return h(
      "li",
      { title: serving.length ? serving.map((w) => `${w.name}${w.alive ? "" : " (silent)"} — seen ${w.seen_at || "?"}`).join("\n") : "no worker has announced itself" },
      h("span", { class: alive.length ? "wdot up" : "wdot", role: "img", "aria-label": alive.length ? "worker live" : "no live worker" }),
      h("span", { class: "qname" }, q),
      h("span", { class: depth > 100 ? "qbar hot" : "qbar" }, h("i", { style: `width: ${Math.min(100, (100 * depth) / max)}%` })),
      h("span", { class: "num" }, fmtNumber(depth)),
      h("span", { class: alive.length ? "qworkers" : "qworkers down" }, alive.length ? `${alive.length} live worker${alive.length > 1 ? "s" : ""}: ${alive.map((w) => w.name).join(", ")}` : "no live worker"),
    );
  });
  // Messages a worker recorded and acknowledged instead of running: each has an open alert.
  if (deadLetters?.open) {
    items.push(
      h(
        "li",
        { class: "dead-letters", title: (deadLetters.latest || []).map((a) => a.message).join("\n") },
        h("span", { class: "wdot", role: "img", "aria-label": "dead letters" }),
        h("a", { class: "qname", href: "/admin/orchestration/alert/?kind__exact=dead_letter&open=yes" }, `${fmtNumber(deadLetters.open)} dead letter${deadLetters.open > 1 ? "s" : ""}`),
        h("span", { class: "qworkers down" }, "malformed messages, recorded and acknowledged: see the alerts"),
      ),
    );
  }
  $("queues").replaceChildren(...items);
}

// --- selection ------------------------------------------------------------------------------------

function selectSaga(id) {
  if (!id) return;
  id = id.toLowerCase();
  if (id === state.selectedId) return;
  state.selectedId = id;
  state.watched = { id, header: state.sagas.get(id) || null, steps: new Map(), events: [], lastSeq: 0, loaded: false, rendered: 0 };
  graph.pick(null);
  list.select(id);
  history.replaceState(null, "", `${location.pathname}${location.search}#saga=${id}`);
  sendWatch(id, { force: true });
  renderSaga("full");
}

$("copy-id").addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText(state.selectedId || "");
    toast("Copied", state.selectedId, "ok");
  } catch {
    toast("Could not copy", "The browser refused the clipboard.", "err");
  }
});

// --- actions -------------------------------------------------------------------------------------

const dialog = $("action-dialog");
let dialogAction = null;

const ACTION_TEXT = {
  cancel: {
    title: "Cancel this order?",
    text: "Nothing more will start; steps in flight finish, then every step that succeeded is undone (stock released, payment refunded). The customer is told.",
    confirm: "Cancel the order",
  },
  retry: {
    title: "Retry this saga?",
    text: "A parked saga resumes where it stopped; steps waiting out a backoff get their next attempt now. Fix the cause first, or it parks again.",
    confirm: "Retry now",
  },
  skip: {
    title: "Skip a compensation?",
    text: "Marks the compensation as settled by hand, so the saga finishes compensating. Only do this after undoing the step yourself (for example, refunding by hand).",
    confirm: "Skip it",
  },
};

for (const btn of document.querySelectorAll(".actions [data-action]")) {
  btn.addEventListener("click", () => openAction(btn.dataset.action));
}

function openAction(kind) {
  const header = state.watched?.header;
  if (!header) return;
  const allowed = allowedActions(header);
  if (!allowed[kind].ok) return;
  dialogAction = { kind, saga: header.id };
  const text = ACTION_TEXT[kind];
  $("dialog-title").textContent = text.title;
  $("dialog-text").textContent = `${text.text} Saga ${shortId(header.id)}${header.order_id ? `, order ${shortId(header.order_id)}` : ""}.`;
  $("dialog-confirm").textContent = text.confirm;
  $("dialog-confirm").className = kind === "cancel" ? "btn btn-danger" : "btn btn-primary";
  const stepField = $("dialog-step-field");
  stepField.hidden = kind !== "skip";
  const select = $("dialog-step");
  select.replaceChildren(...(allowed.skip.steps || []).map((s) => h("option", { value: s }, s)));
  const reason = $("dialog-reason");
  reason.value = "";
  reason.required = kind === "skip";
  $("dialog-reason-label").textContent = kind === "skip" ? "Reason (required: what you did by hand)" : "Reason (optional, recorded in the timeline)";
  dialog.returnValue = "";
  dialog.showModal();
  reason.focus();
}

dialog.addEventListener("close", () => {
  if (dialog.returnValue !== "confirm" || !dialogAction) return;
  const { kind, saga } = dialogAction;
  dialogAction = null;
  const reason = $("dialog-reason").value.trim();
  const msg = { action: kind, saga, reason, request_id: requestId() };
  if (kind === "skip") msg.step = $("dialog-step").value;
  if (!feed.send(msg)) {
    toast("Not sent", "The dashboard is not connected; try again once it is live.", "err");
    return;
  }
  state.pending.set(msg.request_id, { kind, saga, at: Date.now(), step: msg.step });
  toast(`${capitalise(kind)} sent`, `Saga ${shortId(saga)}: waiting for the answer…`);
  setTimeout(() => {
    if (state.pending.delete(msg.request_id)) {
      toast(`No answer to ${kind}`, `Saga ${shortId(saga)}: the server did not answer in 15 s. Check the timeline.`, "err");
      render({ saga: true });
    }
  }, 15_000);
  render({ saga: true });
});

function settleAction(msg) {
  const pending = state.pending.get(msg.request_id);
  state.pending.delete(msg.request_id);
  const kind = pending?.kind || msg.action || "action";
  const saga = pending?.saga || msg.saga;
  const title = `${capitalise(human(kind))} ${msg.ok ? "accepted" : "refused"}`;
  const body = `${saga ? `Saga ${shortId(saga)}: ` : ""}${msg.message || msg.code || (msg.ok ? "accepted" : "refused")}`;
  toast(title, body, msg.ok ? "ok" : "err");
  render({ saga: true });
}

function capitalise(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : text;
}

function requestId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

function toast(title, text, kind = "") {
  // Kept for the tests (a toast is gone after a few seconds).
  state.toasts.push({ title, text, kind, at: Date.now() });
  if (state.toasts.length > 50) state.toasts.shift();
  const el = h("div", { class: `toast ${kind}`, role: kind === "err" ? "alert" : "status" }, h("b", {}, title), h("span", {}, text || ""));
  $("toasts").append(el);
  setTimeout(() => el.remove(), kind === "err" ? 9000 : 5000);
  while ($("toasts").children.length > 4) $("toasts").firstElementChild.remove();
}

// --- connection status ------------------------------------------------------------------------

function setConnection(status, info = {}) {
  state.conn = status;
  const conn = $("conn");
  conn.dataset.state = status;
  const text = conn.querySelector(".conn-text");
  const banner = $("banner");
  if (status === "live") {
    text.textContent = "Live";
    banner.hidden = true;
  } else if (status === "connecting") {
    text.textContent = "Connecting…";
  } else if (status === "reconnecting") {
    text.textContent = "Reconnecting…";
  } else if (status === "offline") {
    state.offlineSince ??= Date.now();
    text.textContent = `Offline · retry in ${Math.ceil((info.retryInMs || 0) / 1000)}s`;
    if (info.failures >= 3) {
      banner.hidden = false;
      banner.replaceChildren("The live feed is unreachable; what you see may be out of date. ", h("a", { href: "#", onclick: (e) => (e.preventDefault(), feed.reconnectNow()) }, "Retry now"));
    }
  } else if (status === "denied") {
    text.textContent = info.code === 4401 ? "Signed out" : "Not allowed";
    banner.hidden = false;
    banner.replaceChildren(
      info.code === 4401 ? "Your session has ended. " : "The live feed refused this account (staff only). ",
      h("a", { href: `/admin/login/?next=${encodeURIComponent(location.pathname)}` }, "Sign in again"),
    );
  }
  if (state.selectedId) render({ saga: true });
}

// --- once a second: clock, ages, countdowns -------------------------------------------------------

function tick() {
  $("clock").textContent = `${fmtClock(serverNow())} UTC`;
  list.tick();
  const w = state.watched;
  if (w?.loaded && w.header) {
    graph.update(w.header, w.steps);
    renderMeta(w.header);
    renderActions(w.header); // an allowed cancel may expire (`until`)
    if (graph.picked) renderPicked(graph.picked);
  }
}
setInterval(tick, 1000);

// --- start -----------------------------------------------------------------------------------------

$("legend-states").replaceChildren(
  ...["pending", "running", "retrying", "succeeded", "failed", "compensating", "compensated", "compensation_failed", "skipped", "confirmed"].map((s) =>
    h("span", { class: "lg-state", dataset: { state: s } }, h("i", { "aria-hidden": "true" }), human(s)),
  ),
);
$("outcomes-legend").replaceChildren(
  h("span", {}, h("i", { style: "background: #7aa7ff; height: 3px; vertical-align: 2px" }), "started"),
  ...OUTCOME_SERIES.map((s) => h("span", {}, h("i", { style: `background: ${s.color}` }), s.label)),
);
for (const tile of document.querySelectorAll(".kpi[data-filter]")) {
  tile.addEventListener("click", () => list.setStateFilter(tile.dataset.filter));
}
$("timeline-wrap").addEventListener("scroll", () => {
  const wrap = $("timeline-wrap");
  if (followScroll) return; // our own scroll
  $("follow").checked = wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 30;
});
$("follow").addEventListener("change", () => {
  if ($("follow").checked) $("timeline-wrap").scrollTop = $("timeline-wrap").scrollHeight;
});
window.addEventListener("resize", () => state.overview && outcomeBars($("outcomes-chart"), state.overview.minutes || []));

// The timeline opens a step's details too (click, or Enter on a focused row).
function pickFromTimeline(event) {
  const row = event.target.closest("tr[data-step]");
  if (!row || !row.dataset.step) return;
  if (event.type === "keydown" && event.key !== "Enter" && event.key !== " ") return;
  event.preventDefault();
  graph.pick(row.dataset.step === graph.picked ? null : row.dataset.step);
}
$("timeline").addEventListener("click", pickFromTimeline);
$("timeline").addEventListener("keydown", pickFromTimeline);

// The graph from the keyboard: arrows move across the steps (definition order), Enter or Space
// opens the picked one's details (already open once picked), Escape closes them.
$("saga-graph").addEventListener("keydown", (event) => {
  const def = graph.definition;
  if (!def) return;
  const names = [...def.steps, ...(def.on_failure || [])].map((s) => s.name);
  const at = names.indexOf(graph.picked);
  let next = null;
  if (event.key === "ArrowRight" || event.key === "ArrowDown") next = names[Math.min(names.length - 1, at + 1)];
  else if (event.key === "ArrowLeft" || event.key === "ArrowUp") next = names[Math.max(0, at < 0 ? 0 : at - 1)];
  else if (event.key === "Home") next = names[0];
  else if (event.key === "End") next = names[names.length - 1];
  else if (event.key === "Escape" && graph.picked) next = "";
  else if ((event.key === "Enter" || event.key === " ") && graph.picked) {
    event.preventDefault();
    $("inspector").scrollIntoView({ block: "nearest" });
    return;
  } else return;
  event.preventDefault();
  graph.pick(next || null);
  $("graph-steps").textContent = next ? `${next}: ${statusLine(state.watched?.steps.get(next))}` : "No step picked";
});

// Keys anywhere (outside a field): / searches the whole history, Escape closes the step.
document.addEventListener("keydown", (event) => {
  if (event.target.closest("input, textarea, select, [contenteditable]") || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "/") {
    event.preventDefault();
    $("f-q").focus();
  } else if (event.key === "Escape" && graph.picked && !document.querySelector("dialog[open]")) {
    graph.pick(null);
  }
});

initTheme($("theme-toggle"));
search.fromUrl();
search.loadViews();
bulk.render();

// A link to a saga (`#saga=<id>`), on load or followed later.
function selectFromHash() {
  const fromHash = /^#saga=([0-9a-fA-F-]{36})$/.exec(location.hash);
  if (fromHash) selectSaga(fromHash[1]);
}
window.addEventListener("hashchange", selectFromHash);
selectFromHash();

// For the browser tests and the feed benchmark (loadtest/feed_bench.py).
window.dashboard = {
  search,
  bulk,
  inspector,
  list,
  cy: graph.cy,
  platformCy: platform.cy,
  state,
  select: selectSaga,
  feed,
  get connected() {
    return feed.isOpen && state.user != null;
  },
};
feed.connect();
