// The whole platform as a graph: the orchestrator in the middle, the services around it, and
// the message traffic of the last minute as edges (width follows the rate, red while failing).

const KIND_COLORS = { command: "#4f8dff", reply: "#2ed3c0", event: "#c58cff" };

const STYLE = [
  {
    selector: "node",
    style: {
      shape: "round-rectangle",
      width: 150,
      // Grows with the label's lines (name, rate, status, breaker): 12 px at 1.3 line height.
      height: "data(height)",
      "background-color": "#16223c",
      "border-width": 2,
      "border-color": "data(border)",
      label: "data(label)",
      color: "#e7ecf6",
      "font-size": 12,
      "font-family": "Inter, system-ui, sans-serif",
      "text-wrap": "wrap",
      "text-valign": "center",
      "text-halign": "center",
      "line-height": 1.3,
    },
  },
  // The hub's lines must fit inside the ellipse, whose sides close in above and below the middle.
  { selector: "node.hub", style: { shape: "ellipse", width: 176, "background-color": "#1b2d55" } },
  { selector: "node.down", style: { "border-style": "dashed" } },
  { selector: "node.breaker-open", style: { "border-width": 4, "border-style": "double" } },
  { selector: "node.failing", style: { "background-color": "#2b1620" } },
  {
    selector: "edge",
    style: {
      width: "data(width)",
      "curve-style": "bezier",
      "control-point-step-size": 16,
      "line-color": "data(color)",
      "target-arrow-color": "data(color)",
      "target-arrow-shape": "triangle",
      "arrow-scale": 0.6,
      opacity: "data(opacity)",
    },
  },
  {
    selector: "edge.event",
    style: { "curve-style": "unbundled-bezier", "control-point-distances": "data(bend)", "control-point-weights": 0.5 },
  },
  { selector: "edge.idle", style: { "line-style": "dashed", "line-dash-pattern": [3, 4] } },
];

export class PlatformGraph {
  constructor(container) {
    this.container = container;
    this.nodes = [];
    this.cy = cytoscape({
      container,
      style: STYLE,
      elements: [],
      userZoomingEnabled: false,
      userPanningEnabled: false,
      boxSelectionEnabled: false,
      autoungrabify: true,
      autounselectify: true,
      maxZoom: 1.3,
    });
    new ResizeObserver(() => this.fit()).observe(container);
  }

  // Deferred to the next frame: fitting in the same tick as a label change makes Cytoscape
  // (3.34) draw the new label clipped to the old one's width.
  fit() {
    if (this.fitQueued) return;
    this.fitQueued = true;
    requestAnimationFrame(() => {
      this.fitQueued = false;
      this.cy.resize();
      if (this.cy.nodes().length) this.cy.fit(undefined, 14);
    });
  }

  // flow: overview.flow; queues: overview.queues; workers: overview.workers;
  // breakers: overview.breakers ({service: {state}}: closed, open or half_open)
  update(flow, queues = {}, workers = [], breakers = {}) {
    if (!flow) return;
    const cy = this.cy;
    const names = flow.nodes || [];
    const alive = new Set();
    for (const w of workers) if (w.alive) for (const q of w.queues || []) alive.add(q);
    const hub = names.includes("orchestrator") ? "orchestrator" : names[0];
    const known = workers.length > 0;
    cy.batch(() => {
      if (names.join() !== this.nodes.join()) {
        // The orchestrator on the left, the services in a column on the right: commands and
        // replies run across, a choreography's events arc between the services.
        cy.elements().remove();
        this.nodes = [...names];
        cy.add(
          names.map((name) => ({ group: "nodes", data: { id: name, label: name, border: "#3a4a72", height: 54 }, classes: name === hub ? "hub" : "" })),
        );
      }
      // A service's reaction to its own event (a choreography's first step run by orders) is no
      // message between two nodes: Cytoscape cannot draw a self-loop of this edge style.
      const edges = (flow.edges || []).filter((e) => e.source !== e.target);
      const traffic = new Map(names.map((n) => [n, { rate: 0, failing: 0 }]));
      const maxRate = Math.max(1, ...edges.map((e) => e.per_min || 0));
      for (const e of edges) {
        for (const end of [e.source, e.target]) {
          const t = traffic.get(end);
          if (!t) continue;
          t.rate += e.per_min || 0;
          t.failing += e.failures_per_min || 0;
        }
      }
      for (const name of names) {
        const node = cy.$id(name);
        const depth = queues[name];
        const up = alive.has(name);
        const t = traffic.get(name);
        const lines = [name, `${fmtRate(t.rate)} msg/min`];
        const status = [t.failing ? `${fmtRate(t.failing)} failing` : null, depth != null ? `${depth} queued` : null, known && !up ? "no worker" : null]
          .filter(Boolean)
          .join(" · ");
        if (status) lines.push(status);
        // A closed breaker is the normal case: only an open or half-open one takes a line.
        const breaker = breakers[name]?.state;
        if (breaker && breaker !== "closed") lines.push(`breaker ${breaker.replace("_", "-")}`);
        // 12 px at 1.3 line height is 15.6 px a line; the hub's ellipse needs more room around.
        const height = name === hub ? 40 + lines.length * 16 : Math.max(54, 18 + lines.length * 16);
        node.data({ label: lines.join("\n"), height, breaker: breaker || "", border: breaker && breaker !== "closed" ? "#f5a524" : t.failing ? "#f0524f" : !known ? "#3a4a72" : up ? "#2fc26b" : "#f0524f" });
        node.toggleClass("breaker-open", breaker === "open" || breaker === "half_open");
        node.toggleClass("down", known && !up);
        node.toggleClass("failing", t.failing > 0);
      }
      // The services in a column, spaced for the tallest (their labels have 2 to 4 lines), so
      // that no two boxes touch and the events' arcs between neighbours stay visible.
      const others = names.filter((n) => n !== hub);
      const gap = Math.max(...others.map((n) => cy.$id(n).data("height")), 54) + 26;
      for (const name of names) {
        const i = others.indexOf(name);
        cy.$id(name).position(name === hub ? { x: 0, y: 0 } : { x: 210, y: (i - (others.length - 1) / 2) * gap });
      }
      const wanted = new Set();
      for (const e of edges) {
        if (!cy.$id(e.source).nonempty() || !cy.$id(e.target).nonempty()) continue;
        const id = `${e.kind}:${e.source}>${e.target}`;
        wanted.add(id);
        const rate = e.per_min || 0;
        const failing = (e.failures_per_min || 0) > 0;
        const from = cy.$id(e.source).position();
        const to = cy.$id(e.target).position();
        const data = {
          width: rate ? 1.5 + 8 * Math.sqrt(rate / maxRate) : 1,
          color: failing ? "#f0524f" : KIND_COLORS[e.kind] || "#7d8aab",
          opacity: rate ? 0.9 : 0.35,
          // Events between two services in the column bulge to the right, further apart, wider.
          bend: (to.y > from.y ? -1 : 1) * (30 + Math.abs(to.y - from.y) * 0.35),
          kind: e.kind,
          per_min: rate,
          failures_per_min: e.failures_per_min || 0,
        };
        let edge = cy.$id(id);
        if (edge.empty()) edge = cy.add({ group: "edges", data: { id, source: e.source, target: e.target, ...data }, classes: e.kind });
        else edge.data(data);
        edge.toggleClass("failing", failing);
        edge.toggleClass("idle", !rate);
      }
      cy.edges().forEach((edge) => {
        if (!wanted.has(edge.id())) edge.remove();
      });
    });
    if (names.length) this.fit(); // arcs come and go with the traffic: keep them in view
  }
}

function fmtRate(v) {
  return v >= 100 ? Math.round(v).toString() : v >= 10 ? v.toFixed(0) : v.toFixed(1).replace(/\.0$/, "");
}
