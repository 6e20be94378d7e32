// Search over the whole history (GET /api/sagas/search/), with every filter in the page's URL
// (shareable, bookmarkable), a time-range picker, server-side pages, saved views and the CSV
// export of the same filters. Results stay live: the feed's headers update their rows, and a
// new or changed saga makes the page ask the server again (at most every REFRESH_MS).

import { h } from "./format.js";

// The filters the page keeps in its URL (those of GET /api/sagas/).
export const FILTER_KEYS = [
  "q",
  "definition",
  "state",
  "failure_code",
  "step",
  "step_state",
  "newer_than",
  "created_after",
  "created_before",
  "style",
  "customer",
  "sku",
  "order_id",
];
const PAGE_SIZE = 50;
const REFRESH_MS = 2000;

export class SearchPanel {
  constructor(root, { onResults, onNotice, api }) {
    this.root = root;
    this.form = root.querySelector("#search-form");
    this.api = api;
    this.onResults = onResults;
    this.onNotice = onNotice;
    this.active = false;
    this.query = new URLSearchParams();
    this.page = 1;
    this.count = 0;
    this.headers = new Map();
    this.order = [];
    this.loading = false;
    this.refreshTimer = null;
    this.views = [];
    this.$ = (id) => root.querySelector(`#${id}`);

    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.apply(this.fromForm(), { page: 1, push: true });
    });
    for (const el of this.form.querySelectorAll("select")) {
      if (el.id === "saved-views") continue;
      el.addEventListener("change", () => {
        if (el.id === "f-range") this.syncRange();
        if (el.id !== "f-range" || el.value !== "custom") this.apply(this.fromForm(), { page: 1, push: true });
      });
    }
    for (const id of ["f-after", "f-before"]) {
      this.$(id).addEventListener("change", () => {
        this.$("f-range").value = "custom";
        this.syncRange();
        this.apply(this.fromForm(), { page: 1, push: true });
      });
    }
    this.$("search-clear").addEventListener("click", () => this.apply(new URLSearchParams(), { page: 1, push: true }));
    this.$("page-prev").addEventListener("click", () => this.apply(this.query, { page: this.page - 1, push: true }));
    this.$("page-next").addEventListener("click", () => this.apply(this.query, { page: this.page + 1, push: true }));
    this.$("saved-views").addEventListener("change", () => this.openView());
    this.$("view-save").addEventListener("click", () => this.saveView());
    this.$("view-delete").addEventListener("click", () => this.deleteView());
    window.addEventListener("popstate", () => this.fromUrl());
  }

  // --- the URL ---------------------------------------------------------------------------------

  fromUrl() {
    const params = new URLSearchParams(location.search);
    const query = new URLSearchParams();
    for (const [k, v] of params) if (FILTER_KEYS.includes(k)) query.append(k, v);
    const rawPage = params.get("page");
    let page = 1;
    if (rawPage != null) {
      page = /^[1-9][0-9]{0,8}$/.test(rawPage) ? Number(rawPage) : NaN;
    }
    this.fill(query);
    const badPage = Number.isNaN(page);
    if (badPage) this.onNotice({ page: ["A positive integer is required."] });
    return this.apply(query, { page: badPage ? 1 : page, push: false, keepNotice: badPage });
  }

  toUrl(push) {
    const params = new URLSearchParams(this.query);
    if (this.active && this.page > 1) params.set("page", String(this.page));
    const search = params.toString();
    const url = `${location.pathname}${search ? `?${search}` : ""}${location.hash}`;
    if (url === `${location.pathname}${location.search}${location.hash}`) return;
    if (push) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
  }

  // --- the form --------------------------------------------------------------------------------

  fromForm() {
    const q = new URLSearchParams();
    const text = (id) => this.$(id).value.trim();
    if (text("f-q")) q.set("q", text("f-q"));
    for (const key of ["definition", "state", "step", "step_state", "failure_code"]) {
      if (text(`f-${key}`)) q.set(key, text(`f-${key}`));
    }
    const range = this.$("f-range").value;
    if (range === "custom") {
      const after = localToIso(this.$("f-after").value);
      const before = localToIso(this.$("f-before").value);
      if (after) q.set("created_after", after);
      if (before) q.set("created_before", before);
    } else if (range) {
      q.set("newer_than", range);
    }
    // Filters the form has no field for (a shared link's `sku=`, `customer=`) are kept.
    for (const key of ["style", "customer", "sku", "order_id"]) for (const v of this.query.getAll(key)) q.append(key, v);
    return q;
  }

  fill(query) {
    this.$("f-q").value = query.get("q") || "";
    for (const key of ["definition", "state", "step", "step_state"]) setSelect(this.$(`f-${key}`), query.get(key) || "");
    this.$("f-failure_code").value = query.get("failure_code") || "";
    const after = query.get("created_after");
    const before = query.get("created_before");
    if (after || before) {
      this.$("f-range").value = "custom";
      this.$("f-after").value = isoToLocal(after);
      this.$("f-before").value = isoToLocal(before);
    } else {
      setSelect(this.$("f-range"), query.get("newer_than") || "");
      this.$("f-after").value = "";
      this.$("f-before").value = "";
    }
    this.syncRange();
    const extra = ["definition", "state", "failure_code", "step", "newer_than", "created_after", "created_before", "style", "customer", "sku", "order_id"].filter((k) => query.has(k)).length;
    this.$("filters-on").textContent = extra ? `(${extra})` : "";
    // Open on a desktop; a phone keeps the list in view (the count in the summary says it).
    if (extra && window.matchMedia("(min-width: 761px)").matches) this.$("more-filters").open = true;
  }

  syncRange() {
    const custom = this.$("f-range").value === "custom";
    for (const el of this.form.querySelectorAll(".range-field")) el.hidden = !custom;
  }

  // --- asking the server -------------------------------------------------------------------

  async apply(query, { page = 1, push = false, keepNotice = false } = {}) {
    this.query = new URLSearchParams(query);
    this.page = Math.max(1, page);
    this.active = [...this.query.keys()].length > 0;
    this.fill(this.query);
    this.toUrl(push);
    this.$("export-csv").href = `/api/sagas/export.csv${this.query.toString() ? `?${this.query}` : ""}`;
    if (!keepNotice) this.onNotice(null);
    if (!this.active) {
      this.headers = new Map();
      this.order = [];
      this.count = 0;
      this.renderBar();
      this.onResults();
      return;
    }
    await this.fetchPage();
  }

  async fetchPage() {
    const params = new URLSearchParams(this.query);
    params.set("page", String(this.page));
    params.set("page_size", String(PAGE_SIZE));
    this.loading = true;
    this.renderBar();
    let response;
    let body;
    try {
      response = await fetch(`/api/sagas/search/?${params}`, { credentials: "same-origin", headers: { Accept: "application/json" } });
      body = await response.json();
    } catch (err) {
      this.loading = false;
      this.onNotice({ search: [`The search did not answer (${err.message || err}); try again.`] }, "The search failed:");
      this.renderBar();
      return;
    }
    this.loading = false;
    if (response.status === 404 && this.page > 1) {
      // Past the last page (fewer matches since): the last page there is.
      this.page = 1;
      this.toUrl(false);
      return this.fetchPage();
    }
    if (!response.ok) {
      const details = body?.details && Object.keys(body.details).length ? body.details : { search: [body?.message || `HTTP ${response.status}`] };
      this.headers = new Map();
      this.order = [];
      this.count = 0;
      this.error = true;
      this.onNotice(details);
      this.renderBar();
      this.onResults();
      return;
    }
    this.error = false;
    this.count = body.count;
    this.headers = new Map(body.results.map((r) => [r.id, r]));
    this.order = body.results.map((r) => r.id);
    this.renderBar();
    this.onResults();
  }

  // The live feed's headers: rows on this page update at once; a saga this page does not have
  // (a new one) or one whose state changed may change what matches, so the page asks again.
  onHeaders(headers) {
    if (!this.active || this.error) return false;
    let changed = false;
    let refresh = false;
    for (const header of headers) {
      const known = this.headers.get(header.id);
      if (known) {
        if ((header.version ?? 0) > (known.version ?? 0)) {
          if (header.state !== known.state) refresh = true;
          this.headers.set(header.id, header);
          changed = true;
        }
      } else if (this.page === 1) {
        refresh = true;
      }
    }
    if (refresh) this.scheduleRefresh();
    return changed;
  }

  scheduleRefresh() {
    if (this.refreshTimer) return;
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      if (this.active && !this.loading) this.fetchPage();
    }, REFRESH_MS);
  }

  get pages() {
    return Math.max(1, Math.ceil(this.count / PAGE_SIZE));
  }

  renderBar() {
    const bar = this.$("results-bar");
    const pager = this.root.querySelector("#pager");
    bar.hidden = !this.active;
    pager.hidden = !this.active || this.count <= PAGE_SIZE;
    this.root.querySelector("#live-filters").hidden = this.active;
    this.root.querySelector("#state-filters").hidden = this.active;
    if (!this.active) return;
    const n = this.count.toLocaleString("en-US");
    bar.textContent = this.loading ? "Searching…" : this.error ? "No results: see the notice above." : `${n} saga${this.count === 1 ? "" : "s"} match over the whole history · newest first · live`;
    this.root.querySelector("#list-count").textContent = this.loading ? "" : `${n} found`;
    this.root.querySelector("#page-info").textContent = `page ${this.page} of ${this.pages.toLocaleString("en-US")}`;
    this.root.querySelector("#page-prev").disabled = this.page <= 1;
    this.root.querySelector("#page-next").disabled = this.page >= this.pages;
  }

  // --- saved views ---------------------------------------------------------------------------

  async loadViews() {
    try {
      const response = await fetch("/api/sagas/views/", { credentials: "same-origin" });
      if (!response.ok) return;
      this.views = await response.json();
    } catch {
      return;
    }
    this.renderViews();
  }

  renderViews(selected = "") {
    const select = this.$("saved-views");
    select.replaceChildren(
      h("option", { value: "" }, this.views.length ? "Saved views…" : "No saved view yet"),
      ...this.views.map((v) => h("option", { value: String(v.id) }, v.name)),
    );
    select.value = selected;
    this.$("view-delete").hidden = !selected;
  }

  openView() {
    const id = this.$("saved-views").value;
    this.$("view-delete").hidden = !id;
    const view = this.views.find((v) => String(v.id) === id);
    if (view) this.apply(new URLSearchParams(view.query), { page: 1, push: true });
  }

  async saveView() {
    const name = window.prompt("Name this view (it is saved for you only):", "");
    if (!name || !name.trim()) return;
    const { ok, body } = await this.api("/api/sagas/views/", { name: name.trim(), query: this.query.toString() });
    if (!ok) {
      this.onNotice(body?.details && Object.keys(body.details).length ? body.details : { view: [body?.message || "Not saved."] }, "The view was not saved:");
      return;
    }
    this.views = [...this.views, body].sort((a, b) => a.name.localeCompare(b.name));
    this.renderViews(String(body.id));
  }

  async deleteView() {
    const id = this.$("saved-views").value;
    if (!id) return;
    await this.api(`/api/sagas/views/${id}/`, null, "DELETE");
    this.views = this.views.filter((v) => String(v.id) !== id);
    this.renderViews();
  }
}

function setSelect(select, value) {
  select.value = value;
  if (select.value !== value) {
    // A value from a shared link the form does not list: keep it, visibly.
    select.append(h("option", { value }, value));
    select.value = value;
  }
}

// <input type="datetime-local"> speaks the browser's local time without a zone; the URL and the
// API speak ISO 8601 with one.
function localToIso(value) {
  if (!value) return "";
  const t = new Date(value);
  return Number.isNaN(t.getTime()) ? "" : t.toISOString();
}

function isoToLocal(iso) {
  if (!iso) return "";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return "";
  const local = new Date(t.getTime() - t.getTimezoneOffset() * 60_000);
  return local.toISOString().slice(0, 19);
}
