// The flow graph of one saga, drawn from its definition (hello.definitions) with Cytoscape and
// the dagre layout: steps top to bottom in dependency order, parallel branches side by side in
// the same row, the failure path in its own box beside the first steps. Live state only changes node data and
// classes; the layout is computed once per definition, so nothing jumps while a saga runs.

import { fmtCountdown, fmtDuration, human, serverNow, ts } from "./format.js";

export const STATE_COLORS = {
  pending: "#6b7a99",
  running: "#4f8dff",
  retrying: "#f5a524",
  succeeded: "#2fc26b",
  failed: "#f0524f",
  compensating: "#c58cff",
  compensated: "#9a6bff",
  compensation_failed: "#ff3d71",
  skipped: "#9aa7c0",
  confirming: "#2ed3c0",
  confirmed: "#17b890",
  confirm_failed: "#ff3d71",
};

// States in which the step's compensation has run, is running, or gave up.
const COMP_CLASS = {
  compensated: "comp-ran",
  compensating: "comp-running",
  compensation_failed: "comp-failed",
  skipped: "comp-skipped",
};

const NARROW_PX = 600;
const IN_MOTION = new Set(["running", "retrying", "compensating", "confirming"]);

const STYLE = [
  {
    selector: "node.step",
    style: {
      shape: "round-rectangle",
      width: 172,
      height: 60,
      "background-color": "data(color)",
      "background-opacity": 0.16,
      "border-width": 2.5,
      "border-color": "data(color)",
      label: "data(label)",
      color: "#e7ecf6",
      "font-size": 11,
      "font-family": "Inter, system-ui, sans-serif",
      "text-wrap": "wrap",
      "text-max-width": 164,
      "text-valign": "center",
      "text-halign": "center",
      "line-height": 1.35,
      "underlay-color": "data(color)",
      "underlay-padding": 0,
      "underlay-opacity": 0,
      "underlay-shape": "round-rectangle",
      "transition-property": "underlay-opacity, underlay-padding",
      "transition-duration": 0.55,
    },
  },
  { selector: "node.step.st-pending", style: { "border-style": "dashed", "background-opacity": 0.05, color: "#b7c1d8" } },
  { selector: "node.step.moving", style: { "underlay-opacity": 0.16, "underlay-padding": 4 } },
  { selector: "node.step.moving.beat", style: { "underlay-opacity": 0.34, "underlay-padding": 9 } },
  { selector: "node.step.pivot", style: { "border-style": "double", "border-width": 7 } },
  { selector: "node.step.failpath.st-pending", style: { opacity: 0.5 } },
  { selector: "node.step.picked", style: { "border-color": "#ffd166", "underlay-color": "#ffd166", "underlay-opacity": 0.22, "underlay-padding": 6 } },
  {
    selector: "node.group",
    style: {
      shape: "round-rectangle",
      "background-color": "#f0524f",
      "background-opacity": 0.03,
      "border-width": 1,
      "border-style": "dashed",
      "border-color": "#3a4870",
      label: "data(label)",
      color: "#7d8aab",
      "font-size": 10,
      "text-transform": "uppercase",
      "text-valign": "top",
      "text-halign": "center",
      "text-margin-y": -4,
      padding: 14,
    },
  },
  { selector: "node.group.active", style: { "border-color": "#8a3a48", color: "#ff9a9a" } },
  {
    selector: "edge.forward",
    style: {
      width: 2,
      "line-color": "#3a4a72",
      "target-arrow-color": "#3a4a72",
      "target-arrow-shape": "triangle",
      "arrow-scale": 0.9,
      "curve-style": "taxi",
      "taxi-direction": "downward",
      "taxi-turn": "50%",
      "taxi-radius": 10,
    },
  },
  { selector: "edge.forward.passed", style: { "line-color": "#2b8f57", "target-arrow-color": "#2b8f57" } },
  { selector: "edge.forward.live", style: { "line-color": "#4f8dff", "target-arrow-color": "#4f8dff", width: 2.5 } },
  { selector: "edge.forward.dead", style: { "line-color": "#2a3350", "target-arrow-color": "#2a3350" } },
  {
    selector: "edge.comp",
    style: {
      width: 2.2,
      "curve-style": "unbundled-bezier",
      "control-point-distances": [-52],
      "control-point-weights": [0.5],
      "line-color": "#9aa7c0",
      "target-arrow-color": "#9aa7c0",
      "target-arrow-shape": "vee",
      "arrow-scale": 0.9,
      label: "data(compLabel)",
      "font-size": 10.5,
      "font-weight": 600,
      color: "#d7c2ff",
      "text-background-color": "#0d1424",
      "text-background-opacity": 0.9,
      "text-background-padding": 2,
      "text-rotation": "none",
      "line-dash-pattern": [7, 5],
    },
  },
  { selector: "edge.comp.comp-none", style: { display: "none" } },
  { selector: "edge.comp.comp-ran", style: { "line-style": "dashed", "line-color": "#b98bff", "target-arrow-color": "#b98bff" } },
  { selector: "edge.comp.comp-running", style: { "line-style": "dashed", "line-color": "#d7b0ff", "target-arrow-color": "#d7b0ff", width: 3 } },
  { selector: "edge.comp.comp-failed", style: { "line-style": "dashed", "line-color": "#ff3d71", "target-arrow-color": "#ff3d71", color: "#ff9ab4", width: 3 } },
  { selector: "edge.comp.comp-skipped", style: { "line-style": "dashed", "line-color": "#7d8aab", "target-arrow-color": "#7d8aab", color: "#b7c1d8" } },
  {
    selector: "edge.comp.comp-would",
    style: { "line-style": "dotted", "line-color": "#7f8baa", "target-arrow-color": "#7f8baa", color: "#9aa7c0", width: 2, opacity: 0.85 },
  },
];

export class SagaGraph {
  constructor(container, { onPick } = {}) {
    this.container = container;
    this.onPick = onPick;
    this.definition = null;
    this.picked = null;
    this.beat = false;
    this.cy = cytoscape({
      container,
      style: STYLE,
      elements: [],
      userZoomingEnabled: false,
      userPanningEnabled: false,
      boxSelectionEnabled: false,
      autoungrabify: true,
      autounselectify: true,
      maxZoom: 1.25,
      minZoom: 0.3,
      pixelRatio: "auto",
    });
    this.cy.on("tap", "node.step", (e) => this.pick(e.target.id() === this.picked ? null : e.target.id()));
    this.cy.on("tap", (e) => {
      if (e.target === this.cy) this.pick(null);
    });
    this.cy.on("mouseover", "node.step", () => (container.style.cursor = "pointer"));
    this.cy.on("mouseout", "node.step", () => (container.style.cursor = ""));
    this.narrow = null;
    new ResizeObserver(() => (this.isNarrow() !== this.narrow ? this.layout() : this.fit())).observe(container);
    // The glow of steps in motion breathes: one class toggled, the transition does the rest.
    setInterval(() => {
      this.beat = !this.beat;
      const moving = this.cy.nodes(".moving");
      if (moving.length) moving.toggleClass("beat", this.beat);
    }, 700);
  }

  pick(name) {
    this.picked = name;
    this.cy.nodes(".step").removeClass("picked");
    if (name) this.cy.$id(name).addClass("picked");
    this.onPick?.(name);
  }

  // Deferred to the next frame: fitting in the same tick as a label change makes Cytoscape
  // (3.34) draw the new label clipped to the old one's width.
  fit() {
    if (this.fitQueued) return;
    this.fitQueued = true;
    requestAnimationFrame(() => {
      this.fitQueued = false;
      this.cy.resize();
      if (this.cy.nodes().length) this.cy.fit(undefined, 26);
    });
  }

  setDefinition(def) {
    if (this.definition && def && this.definition.name === def.name && this.definition.digest === def.digest) return;
    this.definition = def;
    this.picked = null;
    const cy = this.cy;
    cy.elements().remove();
    if (!def) return;
    const elements = [];
    const byName = new Map(def.steps.map((s) => [s.name, s]));
    for (const s of def.steps) {
      elements.push({
        group: "nodes",
        data: { id: s.name, name: s.name, service: s.service, color: STATE_COLORS.pending, state: "pending", label: s.name, kind: "action" },
        classes: `step main st-pending${s.pivot ? " pivot" : ""}`,
      });
    }
    for (const s of def.steps) {
      for (const a of s.after || []) {
        elements.push({ group: "edges", data: { id: `f:${a}>${s.name}`, source: a, target: s.name }, classes: "forward main" });
        const before = byName.get(a);
        if (before && before.compensation) {
          elements.push({
            group: "edges",
            data: { id: `c:${s.name}>${a}`, source: s.name, target: a, of: a, compLabel: "" },
            classes: "comp comp-none",
          });
        }
      }
    }
    const onFailure = def.on_failure || [];
    if (onFailure.length) {
      elements.push({ group: "nodes", data: { id: "group:on_failure", label: "on failure: tell the order and the customer" }, classes: "group" });
      for (const s of onFailure) {
        elements.push({
          group: "nodes",
          data: { id: s.name, name: s.name, service: s.service, color: STATE_COLORS.pending, state: "pending", label: s.name, kind: "on_failure", parent: "group:on_failure" },
          classes: "step failpath st-pending",
        });
      }
      for (const s of onFailure) {
        for (const a of s.after || []) {
          elements.push({ group: "edges", data: { id: `f:${a}>${s.name}`, source: a, target: s.name }, classes: "forward failpath-edge" });
        }
      }
    }
    cy.add(elements);
    this.layout();
  }

  // A phone: too narrow to read the whole graph at once, so the failure path goes below the main
  // graph (not beside it) and the operator may pinch to zoom and drag to pan.
  isNarrow() {
    return this.container.clientWidth > 0 && this.container.clientWidth < NARROW_PX;
  }

  layout() {
    const cy = this.cy;
    this.narrow = this.isNarrow();
    cy.userZoomingEnabled(this.narrow);
    cy.userPanningEnabled(this.narrow);
    const opts = { name: "dagre", rankDir: "TB", nodeSep: 24, rankSep: 50, edgeSep: 10, fit: false, animate: false };
    const mainNodes = cy.nodes(".main");
    mainNodes.union(cy.edges("edge.forward.main")).layout(opts).run();
    const fail = cy.nodes(".failpath");
    if (fail.length) {
      fail.union(cy.edges(".failpath-edge")).layout(opts).run();
      // Beside the first rows of the main graph, which are narrower than its fan-out at the end.
      const mbb = mainNodes.boundingBox();
      const fbb = fail.boundingBox();
      let dx;
      let dy;
      if (this.narrow) {
        dx = mbb.x1 + mbb.w / 2 - (fbb.x1 + fbb.w / 2);
        dy = mbb.y2 + 70 - fbb.y1;
      } else {
        const top = mbb.y1 + 22; // room for the group's title
        const rows = mainNodes.filter((n) => n.boundingBox().y1 < top + fbb.h + 40);
        const right = Math.max(...rows.map((n) => n.boundingBox().x2));
        dx = right + 80 - fbb.x1;
        dy = top - fbb.y1;
      }
      fail.positions((n) => ({ x: n.position("x") + dx, y: n.position("y") + dy }));
    }
    this.fit();
  }

  // steps: Map name -> step (docs/LIVE_FEED.md "Step"); header: the saga header.
  update(header, steps) {
    const def = this.definition;
    if (!def) return;
    const cy = this.cy;
    const now = serverNow();
    // Where a cancel now would undo a step: the server's answer (`actions`, docs/LIVE_FEED.md).
    const cancel = header?.actions?.cancel;
    const cancellable = !!cancel?.allowed && !(cancel.until && now >= ts(cancel.until));
    const specs = new Map([...def.steps, ...(def.on_failure || [])].map((s) => [s.name, s]));
    cy.batch(() => {
      cy.nodes(".step").forEach((node) => {
        const spec = specs.get(node.id());
        const step = steps.get(node.id());
        const state = step?.state || "pending";
        const label = stepLabel(spec, step, now);
        if (node.data("state") !== state) {
          node.removeClass(`st-${node.data("state")}`).addClass(`st-${state}`);
          node.data({ state, color: STATE_COLORS[state] || STATE_COLORS.pending });
        }
        if (node.data("label") !== label) node.data("label", label);
        node.toggleClass("moving", IN_MOTION.has(state));
        node.data("attempts", step?.attempts ?? 0);
      });
      cy.edges("edge.forward").forEach((edge) => {
        const from = steps.get(edge.source().id())?.state;
        const to = steps.get(edge.target().id())?.state;
        const passed = ["succeeded", "confirmed", "confirming", "compensating", "compensated", "compensation_failed", "skipped"].includes(from);
        edge.toggleClass("live", passed && IN_MOTION.has(to));
        edge.toggleClass("passed", passed && !IN_MOTION.has(to));
      });
      cy.edges("edge.comp").forEach((edge) => {
        const target = edge.target().id();
        const spec = specs.get(target);
        const state = steps.get(target)?.state;
        let cls = COMP_CLASS[state];
        if (!cls && cancellable && state === "succeeded") cls = "comp-would";
        cls = cls || "comp-none";
        if (!edge.hasClass(cls)) {
          edge.removeClass("comp-none comp-ran comp-running comp-failed comp-skipped comp-would").addClass(cls);
        }
        const label = cls === "comp-none" ? "" : `↶ ${spec?.compensation || "undo"}`;
        if (edge.data("compLabel") !== label) edge.data("compLabel", label);
        edge.data("comp", cls.replace("comp-", ""));
      });
      const group = cy.$id("group:on_failure");
      if (group.nonempty()) {
        group.toggleClass("active", (def.on_failure || []).some((s) => (steps.get(s.name)?.state || "pending") !== "pending"));
      }
    });
  }
}

// Three lines: the step, its service (and the pivot tag), and what it is doing now.
export function stepLabel(spec, step, now) {
  const name = spec?.name || step?.name || "?";
  const service = spec?.service || step?.service || "";
  const line2 = spec?.pivot ? `${service} · ◆ PIVOT` : service;
  return `${name}\n${line2}\n${statusLine(step, now)}`;
}

function tries(n) {
  return n === 1 ? "1 try" : `${n} tries`;
}

function elapsed(step, now) {
  const start = ts(step.started_at);
  if (start == null) return null;
  const end = ts(step.finished_at) ?? now;
  return end - start;
}

export function statusLine(step, now = serverNow()) {
  if (!step) return "PENDING";
  const state = step.state;
  const upper = human(state).toUpperCase();
  const next = ts(step.next_attempt_at);
  const countdown = next != null ? fmtCountdown(next - now) : null;
  const dur = elapsed(step, now);
  switch (state) {
    case "pending":
      return countdown ? `PENDING · starts in ${countdown}` : "PENDING";
    case "running":
      return `RUNNING · try ${step.attempts}${dur != null ? ` · ${fmtDuration(dur)}` : ""}`;
    case "retrying":
      // `attempts` already counts the try scheduled next: the one that failed is the one before
      // (as the timeline's "attempt N" says).
      return `RETRYING · try ${step.attempts - 1} failed · try ${step.attempts} ${countdown ? `in ${countdown}` : "under way"}`;
    case "succeeded":
      return `SUCCEEDED · ${tries(step.attempts)}${dur != null ? ` · ${fmtDuration(dur)}` : ""}`;
    case "failed":
      return `FAILED · ${tries(step.attempts)}${step.error?.code ? ` · ${step.error.code}` : ""}`;
    case "compensating":
      return countdown
        ? `COMPENSATING · undo try ${step.compensation_attempts - 1} failed · try ${step.compensation_attempts} in ${countdown}`
        : `COMPENSATING · undo try ${step.compensation_attempts || 1}`;
    case "compensated":
      // A step that never took effect (acted false) was compensated as a no-op.
      return `COMPENSATED · ${tries(step.attempts)} · ${step.acted === false ? "nothing to undo" : "undone"}${step.compensation_attempts > 1 ? ` (${tries(step.compensation_attempts)})` : ""}`;
    case "compensation_failed":
      return `UNDO FAILED · ${step.compensation_attempts} tries`;
    case "skipped":
      return "SKIPPED · settled by hand";
    case "confirming":
      return countdown
        ? `CONFIRMING · try ${step.confirm_attempts - 1} failed · try ${step.confirm_attempts} in ${countdown}`
        : `CONFIRMING · try ${step.confirm_attempts || 1}`;
    case "confirmed":
      return `CONFIRMED · ${tries(step.attempts)}${step.confirm_attempts > 1 ? ` + ${step.confirm_attempts} confirms` : ""}`;
    case "confirm_failed":
      return `CONFIRM FAILED · ${step.confirm_attempts} tries`;
    default:
      return upper;
  }
}
