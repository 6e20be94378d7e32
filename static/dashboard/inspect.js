// Payload inspection: the picked step's input (secrets masked by the server), result, error and
// attempt history, read from GET /api/sagas/<id>/export/ (the same JSON the export downloads).
// Opened from the graph (a node) or the timeline (a row); refreshed as the saga moves on.

import { fmtClock, h, human, ts } from "./format.js";

const REFRESH_MS = 1000;

export class Inspector {
  constructor(root) {
    this.el = root.querySelector("#inspector");
    this.body = root.querySelector("#inspector-body");
    this.title = root.querySelector("#inspector-title");
    this.note = root.querySelector("#inspector-note");
    this.cache = null; // {sagaId, version, data}
    this.want = null; // {sagaId, step, version}
    this.timer = null;
    this.onClose = () => {};
    root.querySelector("#inspector-close").addEventListener("click", () => this.onClose());
  }

  show(sagaId, step, version) {
    if (!sagaId || !step) {
      this.want = null;
      this.drawn = null;
      this.el.hidden = true;
      return;
    }
    const same = this.want && this.want.sagaId === sagaId && this.want.step === step;
    this.want = { sagaId, step, version };
    this.el.hidden = false;
    this.title.textContent = `Step ${step}`;
    if (this.cache?.sagaId === sagaId) this.draw();
    else if (!same) {
      this.drawn = null;
      this.body.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    }
    if (!this.cache || this.cache.sagaId !== sagaId || this.cache.version < version) this.load();
  }

  load() {
    if (this.timer) return;
    const since = Date.now() - (this.loadedAt || 0);
    this.timer = setTimeout(() => this.fetch(), Math.max(0, REFRESH_MS - since));
  }

  async fetch() {
    this.timer = null;
    const want = this.want;
    if (!want) return;
    this.loadedAt = Date.now();
    try {
      const response = await fetch(`/api/sagas/${want.sagaId}/export/`, { credentials: "same-origin" });
      const data = await response.json();
      if (!response.ok) throw new Error(data.message || `HTTP ${response.status}`);
      this.cache = { sagaId: want.sagaId, version: data.saga.version, data };
    } catch (err) {
      if (this.want === want) this.body.replaceChildren(h("p", { class: "err", role: "alert" }, `Could not read the step's details: ${err.message || err}`));
      return;
    }
    if (this.want && this.want.sagaId === this.cache.sagaId) {
      this.draw();
      if (this.cache.version < this.want.version) this.load();
    }
  }

  draw() {
    // Called every second (the dashboard's tick): redraw only what changed, so a selection or
    // a scroll inside the payload survives.
    const key = `${this.cache.sagaId}|${this.want.step}|${this.cache.version}`;
    if (key === this.drawn) return;
    this.drawn = key;
    const { data } = this.cache;
    const step = data.steps.find((s) => s.name === this.want.step);
    if (!step) {
      this.body.replaceChildren(h("p", { class: "muted" }, "This saga has no such step."));
      return;
    }
    this.note.textContent = `${step.service} · ${human(step.state)} · ${step.attempts} attempt${step.attempts === 1 ? "" : "s"}`;
    const history = step.history.length
      ? h(
          "ol",
          { class: "attempts" },
          ...step.history.map((e) =>
            h(
              "li",
              { class: /failed|timed_out|gave_up|retry_scheduled/.test(e.kind) ? "bad" : "" },
              h("span", { class: "t" }, fmtClock(ts(e.created_at), { millis: true })),
              " ",
              h("b", {}, human(e.kind)),
              e.data?.attempt != null ? ` · attempt ${e.data.attempt}` : "",
              e.data?.error ? h("span", { class: "err" }, ` · ${e.data.error.code || ""}${e.data.error.message ? `: ${e.data.error.message}` : ""}`) : "",
              e.data?.reason ? h("span", { class: "reason" }, ` · “${e.data.reason}”`) : "",
              e.actor && e.actor !== "engine" ? ` · ${e.actor}` : "",
            ),
          ),
        )
      : h("p", { class: "muted" }, "No attempt yet.");
    this.body.replaceChildren(
      block("Input", step.input, "What the service was sent (secrets masked)."),
      block("Result", step.result, step.result == null ? "No result recorded." : ""),
      block("Error", step.error, step.error == null ? "No error." : "The last error."),
      h("div", { class: "ins-block ins-history" }, h("h4", {}, "Attempt history"), history),
    );
  }
}

function block(title, value, hint) {
  return h(
    "div",
    { class: "ins-block" },
    h("h4", {}, title, hint ? h("small", {}, ` ${hint}`) : null),
    value == null ? null : h("pre", { class: "json", tabindex: "0" }, JSON.stringify(value, null, 2)),
  );
}
