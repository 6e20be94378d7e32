// The saga list: state chips with live counts, style / age / id filters, keyed rows updated in
// place (so scroll position, focus and selection survive a burst of updates).

import { badge, fmtAge, h, human, serverNow, shortId, ts } from "./format.js";

const MAX_ROWS = 400;
// Under a burst, flashing every changed row is noise (and work): a few per frame say "live".
const MAX_FLASHES = 12;
const FLASH = [{ backgroundColor: "#243a6e" }, { backgroundColor: "transparent" }];
const TERMINAL = new Set(["completed", "compensated", "failed", "cancelled"]);

export function isRetrying(header, watched) {
  if (header.retrying != null) return !!header.retrying;
  // Until the header says so, only the watched saga's steps can tell.
  if (watched && watched.id === header.id) {
    for (const s of watched.steps.values()) {
      if (s.state === "retrying" || ((s.state === "compensating" || s.state === "confirming") && s.next_attempt_at)) return true;
    }
  }
  return false;
}

export const STATE_FILTERS = [
  { key: "all", label: "All", test: () => true },
  { key: "active", label: "In flight", color: "running", test: (h) => !TERMINAL.has(h.state) && h.state !== "parked" },
  { key: "attention", label: "Needs attention", color: "parked", test: (h) => h.state === "parked" || !!h.stuck },
  { key: "running", label: "Running", color: "running", test: (h) => h.state === "running" || h.state === "confirming" || h.state === "pending" },
  { key: "retrying", label: "Retrying", color: "retrying", test: (h, ctx) => isRetrying(h, ctx.watched) },
  { key: "compensating", label: "Compensating", color: "compensating", test: (h) => h.state === "compensating" },
  { key: "parked", label: "Parked", color: "parked", test: (h) => h.state === "parked" },
  { key: "stuck", label: "Stuck", color: "stuck", test: (h) => !!h.stuck },
  { key: "failed", label: "Failed", color: "failed", test: (h) => h.state === "failed" },
  { key: "completed", label: "Completed", color: "completed", test: (h) => h.state === "completed" },
  { key: "compensated", label: "Compensated", color: "compensated", test: (h) => h.state === "compensated" },
  { key: "cancelled", label: "Cancelled", color: "cancelled", test: (h) => h.state === "cancelled" },
];

export class SagaList {
  constructor({ list, chips, search, style, age, count, empty, more }, { onSelect, getContext }) {
    this.el = list;
    this.chipsEl = chips;
    this.searchEl = search;
    this.styleEl = style;
    this.ageEl = age;
    this.countEl = count;
    this.emptyEl = empty;
    this.moreEl = more;
    this.onSelect = onSelect;
    this.getContext = getContext;
    this.filter = { state: "all", style: "", age: "", search: "" };
    this.rows = new Map(); // id -> {li, version, state}
    this.order = [];
    this.selectedId = null;
    this.chipEls = new Map();
    this.onChange = () => {};
    // Search results (search.js): the server's page, in its order, instead of the live set.
    this.fixed = null;
    // Bulk selection (bulk.js): the ids ticked, and whether rows show a checkbox at all.
    this.picked = new Set();
    this.selectable = false;
    this.onPickChange = () => {};

    for (const f of STATE_FILTERS) {
      const chip = h(
        "button",
        { type: "button", class: "chip", "aria-pressed": f.key === "all" ? "true" : "false", dataset: { filter: f.key } },
        f.color ? h("span", { class: "sw", style: `background: var(--s-${f.color})`, "aria-hidden": "true" }) : null,
        f.label,
        " ",
        h("span", { class: "n" }, ""),
      );
      chip.addEventListener("click", () => this.setStateFilter(f.key));
      this.chipEls.set(f.key, chip);
      chips.append(chip);
    }
    search.addEventListener("input", () => {
      this.filter.search = search.value.trim().toLowerCase();
      this.onChange();
    });
    search.addEventListener("keydown", (e) => {
      // A full id of a saga that is not in the list (an old one): open it anyway.
      if (e.key === "Enter") {
        const q = search.value.trim().toLowerCase();
        const match = this.order[0];
        if (match) this.onSelect(match);
        else if (/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(q)) this.onSelect(q);
      }
    });
    style.addEventListener("change", () => {
      this.filter.style = style.value;
      this.onChange();
    });
    age.addEventListener("change", () => {
      this.filter.age = age.value;
      this.onChange();
    });
    list.addEventListener("click", (e) => {
      if (e.target.closest("input.pick")) return; // the checkbox ticks, it does not open
      const li = e.target.closest("li.saga-row");
      if (li) this.onSelect(li.dataset.id);
    });
    list.addEventListener("change", (e) => {
      const box = e.target.closest("input.pick");
      if (box) this.setPicked(box.closest("li.saga-row").dataset.id, box.checked);
    });
    list.addEventListener("keydown", (e) => this.onKey(e));
  }

  setStateFilter(key) {
    this.filter.state = key;
    for (const [k, chip] of this.chipEls) chip.setAttribute("aria-pressed", k === key ? "true" : "false");
    this.onChange();
  }

  onKey(e) {
    const li = e.target.closest("li.saga-row");
    if (!li) return;
    if (e.target.closest("input.pick")) return;
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      this.onSelect(li.dataset.id);
    } else if (e.key === "x" && this.selectable) {
      // x ticks the row for a bulk action (as in a mail client).
      e.preventDefault();
      this.setPicked(li.dataset.id, !this.picked.has(li.dataset.id));
    } else if (e.key === "ArrowDown" || e.key === "ArrowUp") {
      e.preventDefault();
      const next = e.key === "ArrowDown" ? li.nextElementSibling : li.previousElementSibling;
      if (next) this.focusRow(next);
    } else if (e.key === "Home" || e.key === "End") {
      e.preventDefault();
      const target = e.key === "Home" ? this.el.firstElementChild : this.el.lastElementChild;
      if (target) this.focusRow(target);
    }
  }

  focusRow(li) {
    for (const row of this.el.children) row.tabIndex = -1;
    li.tabIndex = 0;
    li.focus();
  }

  matches(h, ctx, now) {
    const f = this.filter;
    if (f.style && styleOf(h) !== f.style) return false;
    if (f.age) {
      const [op, secs] = f.age.split(":");
      const age = (now - (ts(h.created_at) ?? now)) / 1000;
      if (op === "lt" ? age > Number(secs) : age < Number(secs)) return false;
    }
    if (f.search && !(h.id.toLowerCase().includes(f.search) || (h.order_id || "").toLowerCase().includes(f.search))) return false;
    return true;
  }

  setPicked(id, on) {
    if (on) this.picked.add(id);
    else this.picked.delete(id);
    const box = this.rows.get(id)?.el.pick;
    if (box) box.checked = on;
    this.onPickChange();
  }

  clearPicked() {
    this.picked.clear();
    for (const row of this.rows.values()) if (row.el.pick) row.el.pick.checked = false;
    this.onPickChange();
  }

  // sagas: Map id -> header. Redraws the rows that changed and puts them in order. With search
  // results (`this.fixed`: the page's ids), those rows in the server's order, unfiltered.
  render(sagas) {
    const ctx = this.getContext();
    const now = serverNow();
    let shown = [];
    if (this.fixed) {
      shown = this.fixed.map((id) => sagas.get(id)).filter(Boolean);
    } else {
      const stateTest = STATE_FILTERS.find((f) => f.key === this.filter.state)?.test || (() => true);
      const counts = new Map(STATE_FILTERS.map((f) => [f.key, 0]));
      for (const h of sagas.values()) {
        if (!this.matches(h, ctx, now)) continue;
        for (const f of STATE_FILTERS) if (f.test(h, ctx)) counts.set(f.key, counts.get(f.key) + 1);
        if (stateTest(h, ctx)) shown.push(h);
      }
      for (const [key, chip] of this.chipEls) chip.querySelector(".n").textContent = counts.get(key) ? counts.get(key).toLocaleString("en-US") : "";
      shown.sort((a, b) => (b.created_at || "").localeCompare(a.created_at || "") || b.id.localeCompare(a.id));
    }
    const visible = shown.slice(0, MAX_ROWS);
    const ids = visible.map((h) => h.id);
    const keep = new Set(ids);
    for (const [id, row] of this.rows) {
      if (!keep.has(id)) {
        row.li.remove();
        this.rows.delete(id);
      }
    }
    this.flashes = 0;
    for (const h of visible) this.upsert(h, ctx, now);
    if (ids.join() !== this.order.join()) {
      // Re-append in order; moving an existing node keeps its focus and Chromium's scroll
      // anchoring keeps the viewport on the rows the operator is looking at.
      const frag = document.createDocumentFragment();
      for (const id of ids) frag.append(this.rows.get(id).li);
      this.el.append(frag);
      this.order = ids;
    }
    this.ensureTabStop();
    if (this.fixed) {
      // The search says how many match over every page (search.js); here only the page.
      this.emptyEl.hidden = shown.length > 0;
      this.emptyEl.textContent = "No saga matches this search.";
      this.moreEl.hidden = true;
      return;
    }
    this.countEl.textContent = `${shown.length.toLocaleString("en-US")} of ${sagas.size.toLocaleString("en-US")}`;
    this.emptyEl.hidden = shown.length > 0;
    this.emptyEl.textContent = sagas.size
      ? "No saga matches these filters."
      : "No saga yet: orders placed on the site or through the API appear here as they start.";
    this.moreEl.hidden = shown.length <= MAX_ROWS;
    this.moreEl.textContent = `Showing the newest ${MAX_ROWS} of ${shown.length.toLocaleString("en-US")}: narrow the filters or search an id.`;
  }

  ensureTabStop() {
    if ([...this.el.children].some((li) => li.tabIndex === 0)) return;
    const target = (this.selectedId && this.rows.get(this.selectedId)?.li) || this.el.firstElementChild;
    if (target) target.tabIndex = 0;
  }

  // A row is built once and then updated in place: under a burst hundreds of rows change
  // every frame, and rebuilding them costs more than the rest of the frame together.
  createRow(header, now) {
    const el = {
      badge: badge(header.state),
      flags: h("span", { class: "flags" }),
      bar: h("i", {}),
      step: h("span", { class: "sprog-step" }),
      style: h("span", { class: "style-tag" }),
      failure: h("div", { class: "r3 err", hidden: true }),
      progress: null,
      pick: null,
    };
    el.progress = h("span", { class: "sprog", role: "presentation" }, el.bar);
    if (this.selectable) {
      el.pick = h("input", { type: "checkbox", class: "pick", tabindex: "-1", "aria-label": `Select saga ${shortId(header.id)} for a bulk action` });
      el.pick.checked = this.picked.has(header.id);
    }
    const li = h(
      "li",
      { class: "saga-row", role: "option", tabindex: "-1", id: `saga-${header.id}`, dataset: { id: header.id } },
      h(
        "div",
        { class: "r1" },
        el.pick,
        el.badge,
        el.flags,
        h("span", { class: "sid", title: header.id }, shortId(header.id)),
        header.order_id ? h("span", { class: "oid", title: `order ${header.order_id}` }, `order ${shortId(header.order_id)}`) : null,
        h("span", { class: "age num", title: "age", dataset: { created: header.created_at || "" } }, ageText(header, now)),
      ),
      h("div", { class: "r2" }, el.progress, el.step, el.style),
      el.failure,
    );
    return { li, el, key: null, state: header.state, flagKey: "" };
  }

  upsert(header, ctx, now) {
    const retrying = isRetrying(header, ctx.watched);
    const key = `${header.version}|${header.stuck}|${retrying}`;
    let row = this.rows.get(header.id);
    if (row && row.key === key) return;
    const fresh = !row;
    if (fresh) {
      row = this.createRow(header, now);
      this.rows.set(header.id, row);
    }
    const { li, el } = row;
    row.key = key;
    el.badge.dataset.state = header.state;
    el.badge.textContent = human(header.state);
    const stuck = header.stuck && header.state !== "parked";
    const flagKey = `${stuck}|${retrying}`;
    if (flagKey !== row.flagKey) {
      row.flagKey = flagKey;
      el.flags.replaceChildren(...[stuck && badge("stuck", "stuck", { small: true }), retrying && badge("retrying", "retrying", { small: true })].filter(Boolean));
    }
    const done = header.steps_done ?? 0;
    const total = header.steps_total || 0;
    const pct = total ? Math.round((100 * done) / total) : TERMINAL.has(header.state) ? 100 : 0;
    el.progress.dataset.state = header.state;
    el.bar.style.width = `${pct}%`;
    el.step.textContent = header.active_step ? `${header.active_step} · ${done}/${total}` : total ? `${done}/${total} steps` : "";
    el.style.textContent = styleOf(header);
    el.failure.hidden = !header.failure;
    if (header.failure) {
      el.failure.textContent = `${header.failure.code}${header.failure.message ? `: ${header.failure.message}` : ""}`;
      el.failure.title = header.failure.message || "";
    }
    li.setAttribute("aria-selected", header.id === this.selectedId ? "true" : "false");
    li.setAttribute("aria-label", `${header.state}${stuck ? ", stuck" : ""}${retrying ? ", retrying" : ""} saga ${shortId(header.id)}${header.order_id ? `, order ${shortId(header.order_id)}` : ""}`);
    if (!fresh && row.state !== header.state && this.flashes < MAX_FLASHES) {
      // The Web Animations API restarts an animation without forcing a layout (toggling a
      // class would need one per row: a burst of a hundred changes cost 200 ms a frame).
      this.flashes += 1;
      li.animate(FLASH, { duration: 1200, easing: "ease-out" });
    }
    row.state = header.state;
  }

  select(id) {
    this.selectedId = id;
    for (const [rid, row] of this.rows) row.li.setAttribute("aria-selected", rid === id ? "true" : "false");
    const li = this.rows.get(id)?.li;
    if (li) {
      for (const row of this.el.children) row.tabIndex = -1;
      li.tabIndex = 0;
      li.scrollIntoView({ block: "nearest" });
    }
  }

  tick() {
    const now = serverNow();
    for (const cell of this.el.querySelectorAll(".age")) {
      cell.textContent = fmtAge(now - (ts(cell.dataset.created) ?? now));
    }
  }
}

export function styleOf(header) {
  if (header.style === "orchestrated" && /parallel/.test(header.definition || "")) return "parallel";
  return header.style || "orchestrated";
}

function ageText(header, now) {
  return fmtAge(now - (ts(header.created_at) ?? now));
}
