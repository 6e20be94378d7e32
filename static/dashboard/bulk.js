// Bulk actions (POST /api/sagas/bulk/): retry, cancel or skip the ticked sagas, or every saga
// matching the search, with one reason. First a preview (dry run): how many will be affected,
// which are not eligible and why. Then the eligible ones are sent in chunks, with a progress
// bar and each saga's outcome (a saga another operator changed meanwhile is reported refused).

import { h, human, shortId } from "./format.js";

const CHUNK = 25;
const SHOWN = 30; // refusals listed one by one; the rest are counted
const VERB = { retry: "Retry", cancel: "Cancel", skip: "Skip the parked compensations of" };
const DONE = { retry: "retried", cancel: "cancelled", skip: "skipped" };

export class BulkActions {
  constructor(root, { list, search, api, toast, canOperate }) {
    this.root = root;
    this.list = list;
    this.search = search;
    this.api = api;
    this.toast = toast;
    this.canOperate = canOperate;
    this.allMatching = false;
    this.running = false;
    this.$ = (id) => root.querySelector(`#${id}`);
    this.dialog = this.$("bulk-dialog");
    this.$("bulk-clear").addEventListener("click", () => {
      this.allMatching = false;
      this.list.clearPicked();
    });
    this.$("bulk-all").addEventListener("click", () => {
      this.allMatching = !this.allMatching;
      this.render();
    });
    for (const btn of root.querySelectorAll("[data-bulk]")) btn.addEventListener("click", () => this.open(btn.dataset.bulk));
    this.$("bulk-confirm").addEventListener("click", () => this.confirm());
    this.dialog.addEventListener("close", () => {
      this.plan = null;
    });
    this.dialog.addEventListener("cancel", (e) => {
      if (this.running) e.preventDefault(); // Esc does not abandon a bulk action half-way
    });
  }

  // The selection changed, or the search did.
  render() {
    const picked = this.list.picked.size;
    const searching = this.search.active && !this.search.error && this.search.count > 0;
    if (!searching) this.allMatching = false;
    const bar = this.$("bulk-bar");
    bar.hidden = !this.canOperate() || (!picked && !searching);
    const target = this.allMatching ? this.search.count : picked;
    this.$("bulk-count").textContent = this.allMatching
      ? `All ${this.search.count.toLocaleString("en-US")} matching the search`
      : picked
        ? `${picked} selected`
        : "Bulk:";
    const all = this.$("bulk-all");
    all.hidden = !searching;
    all.textContent = this.allMatching ? "Only the ticked ones" : `all ${this.search.count.toLocaleString("en-US")} matching`;
    all.title = "Act on every saga matching the search, on every page";
    all.setAttribute("aria-pressed", String(this.allMatching));
    for (const btn of this.root.querySelectorAll("[data-bulk]")) btn.disabled = target === 0;
    this.root.querySelector("#bulk-clear").hidden = !picked && !this.allMatching;
  }

  target() {
    return this.allMatching ? { filter: this.search.query.toString() } : { ids: [...this.list.picked] };
  }

  async open(action) {
    const target = this.target();
    this.plan = { action, target, eligible: [] };
    this.running = false;
    this.$("bulk-title").textContent = `${VERB[action]}: checking…`;
    this.$("bulk-preview").replaceChildren(h("p", {}, "Checking which sagas are eligible…"));
    this.$("bulk-progress").hidden = true;
    this.$("bulk-results").hidden = true;
    this.$("bulk-results").replaceChildren();
    this.$("bulk-reason").value = "";
    this.$("bulk-reason").disabled = false;
    this.$("bulk-reason-field").hidden = false;
    const reasonNeeded = action !== "retry";
    this.$("bulk-reason-label").textContent = reasonNeeded ? "Reason (required, recorded in each saga's timeline)" : "Reason (optional, recorded in each saga's timeline)";
    const confirm = this.$("bulk-confirm");
    confirm.disabled = true;
    confirm.hidden = false;
    confirm.className = action === "cancel" ? "btn btn-danger" : "btn btn-primary";
    confirm.textContent = "Confirm";
    this.$("bulk-back").textContent = "Back";
    this.dialog.showModal();
    const { ok, body } = await this.api("/api/sagas/bulk/", { action, ...target, dry_run: true });
    if (this.plan?.target !== target) return; // closed or reopened meanwhile
    if (!ok) {
      this.$("bulk-title").textContent = "Cannot do that";
      this.$("bulk-preview").replaceChildren(h("p", { class: "err", role: "alert" }, problem(body)));
      return;
    }
    this.plan.eligible = body.eligible;
    const n = body.eligible.length;
    this.$("bulk-title").textContent = `${VERB[action]} ${n} saga${n === 1 ? "" : "s"}?`;
    const parts = [
      h("p", { class: "bulk-summary" }, h("b", {}, `${n} of ${body.count}`), ` selected saga${body.count === 1 ? "" : "s"} will be ${DONE[action]}.`),
    ];
    if (body.ineligible.length) {
      const byCode = new Map();
      for (const r of body.ineligible) byCode.set(r.code, (byCode.get(r.code) || 0) + 1);
      parts.push(
        h("p", {}, h("b", {}, `${body.ineligible.length} not eligible`), " (left alone): ", [...byCode].map(([code, count]) => `${count} ${human(code)}`).join(", ")),
        h(
          "ul",
          { class: "bulk-ineligible" },
          ...body.ineligible.slice(0, SHOWN).map((r) => h("li", {}, h("code", { title: r.id }, shortId(r.id)), " ", h("span", { class: "why" }, r.message || human(r.code)))),
          body.ineligible.length > SHOWN ? h("li", {}, `…and ${body.ineligible.length - SHOWN} more`) : null,
        ),
      );
    }
    this.$("bulk-preview").replaceChildren(...parts);
    confirm.textContent = n ? `${VERB[action].split(" ")[0]} ${n}` : "Nothing to do";
    confirm.disabled = n === 0;
    this.$("bulk-reason").focus();
  }

  async confirm() {
    const plan = this.plan;
    if (!plan || this.running || !plan.eligible.length) return;
    const reason = this.$("bulk-reason").value.trim();
    if (plan.action !== "retry" && !reason) {
      this.$("bulk-reason").setCustomValidity("A reason is required.");
      this.$("bulk-reason").reportValidity();
      this.$("bulk-reason").setCustomValidity("");
      return;
    }
    this.running = true;
    this.$("bulk-confirm").disabled = true;
    this.$("bulk-back").disabled = true;
    this.$("bulk-reason").disabled = true;
    const meter = this.$("bulk-meter");
    const text = this.$("bulk-progress-text");
    const results = this.$("bulk-results");
    this.$("bulk-progress").hidden = false;
    results.hidden = false;
    meter.max = plan.eligible.length;
    meter.value = 0;
    let accepted = 0;
    let refused = 0;
    for (let i = 0; i < plan.eligible.length; i += CHUNK) {
      const chunk = plan.eligible.slice(i, i + CHUNK);
      text.textContent = `${i} of ${plan.eligible.length} done…`;
      const { ok, body } = await this.api("/api/sagas/bulk/", { action: plan.action, ids: chunk, reason });
      const outcomes = ok ? body.results : chunk.map((id) => ({ id, ok: false, code: body?.code || "error", message: problem(body) }));
      for (const r of outcomes) {
        if (r.ok) accepted += 1;
        else refused += 1;
        results.append(
          h(
            "li",
            { class: r.ok ? "ok" : "refused" },
            h("span", { class: "mark", "aria-hidden": "true" }, r.ok ? "✓" : "✗"),
            h("code", { title: r.id }, shortId(r.id)),
            " ",
            h("span", {}, r.ok ? `${human(DONE[plan.action])}` : `refused: ${r.message || human(r.code)}`),
          ),
        );
      }
      meter.value = Math.min(plan.eligible.length, i + chunk.length);
    }
    text.textContent = `Done: ${accepted} ${DONE[plan.action]}${refused ? `, ${refused} refused (changed meanwhile)` : ""}.`;
    this.$("bulk-title").textContent = `${VERB[plan.action]}: done`;
    this.toast(`Bulk ${plan.action} done`, `${accepted} ${DONE[plan.action]}${refused ? `, ${refused} refused` : ""}.`, refused ? "err" : "ok");
    this.running = false;
    this.$("bulk-back").disabled = false;
    this.$("bulk-back").textContent = "Close";
    this.$("bulk-confirm").hidden = true;
    this.allMatching = false;
    this.list.clearPicked();
  }
}

function problem(body) {
  if (!body) return "The server did not answer.";
  const details = body.details && Object.keys(body.details).length ? ` (${Object.entries(body.details).map(([k, v]) => `${k}: ${flat(v)}`).join("; ")})` : "";
  return `${body.message || body.code || "Refused"}${details}`;
}

function flat(v) {
  if (Array.isArray(v)) return v.map(flat).join(" ");
  if (v && typeof v === "object") return Object.entries(v).map(([k, x]) => `${k}: ${flat(x)}`).join("; ");
  return String(v);
}
