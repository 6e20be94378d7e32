// Hand-drawn SVG charts: sparklines for the tiles, stacked bars for the outcomes per minute.
// A dozen points each, redrawn at most every 2 s: a chart library would be all weight, no gain.

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// The SVG has viewBox "0 0 100 28" and preserveAspectRatio="none": it stretches to its tile.
export function sparkline(svg, values, { color = "#7aa7ff", min = 0 } = {}) {
  const pts = values.filter((v) => Number.isFinite(v));
  svg.replaceChildren();
  if (pts.length < 2) return;
  const max = Math.max(...pts, min + 1e-9);
  const lo = Math.min(min, ...pts);
  const span = max - lo || 1;
  const step = 100 / (pts.length - 1);
  const xy = pts.map((v, i) => [i * step, 27 - ((v - lo) / span) * 22]);
  const line = xy.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(2)},${y.toFixed(2)}`).join("");
  svg.append(
    el("path", { class: "area", d: `${line}L100,28L0,28Z`, fill: color }),
    el("path", { class: "line", d: line, stroke: color }),
  );
}

export const OUTCOME_SERIES = [
  { key: "completed", label: "completed", color: "#2fc26b" },
  { key: "compensated", label: "compensated", color: "#9a6bff" },
  { key: "cancelled", label: "cancelled", color: "#9aa7c0" },
  { key: "failed", label: "failed", color: "#f0524f" },
  { key: "parked", label: "parked", color: "#ff8a3d" },
];

// Stacked bars of the outcomes of each minute, with the sagas started as a line over them.
export function outcomeBars(svg, minutes) {
  const width = Math.max(200, svg.clientWidth || svg.parentElement.clientWidth || 300);
  const height = 130;
  const pad = { l: 26, r: 6, t: 8, b: 16 };
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const n = minutes.length;
  if (!n) return;
  const totals = minutes.map((m) => OUTCOME_SERIES.reduce((s, { key }) => s + (m[key] || 0), 0));
  const max = Math.max(1, ...totals, ...minutes.map((m) => m.started || 0));
  const nice = niceCeil(max);
  const plotW = width - pad.l - pad.r;
  const plotH = height - pad.t - pad.b;
  const slot = plotW / n;
  const barW = Math.max(3, slot * 0.68);
  const y = (v) => pad.t + plotH - (v / nice) * plotH;

  for (const frac of [0, 0.5, 1]) {
    const yy = y(nice * frac);
    svg.append(el("line", { x1: pad.l, x2: width - pad.r, y1: yy, y2: yy, stroke: "#1f2a45", "stroke-width": 1 }));
    const label = el("text", { x: pad.l - 4, y: yy + 3, "text-anchor": "end" });
    label.textContent = formatTick(nice * frac);
    svg.append(label);
  }
  minutes.forEach((m, i) => {
    let acc = 0;
    const x = pad.l + i * slot + (slot - barW) / 2;
    for (const { key, color, label } of OUTCOME_SERIES) {
      const v = m[key] || 0;
      if (!v) continue;
      const rect = el("rect", { x, y: y(acc + v), width: barW, height: Math.max(1, y(acc) - y(acc + v)), fill: color, rx: 1.5 });
      const title = el("title", {});
      title.textContent = `${minuteLabel(m.t)}: ${v} ${label}`;
      rect.append(title);
      svg.append(rect);
      acc += v;
    }
  });
  const line = minutes
    .map((m, i) => `${i ? "L" : "M"}${(pad.l + i * slot + slot / 2).toFixed(1)},${y(m.started || 0).toFixed(1)}`)
    .join("");
  svg.append(el("path", { d: line, fill: "none", stroke: "#7aa7ff", "stroke-width": 1.8, "stroke-linejoin": "round" }));
  minutes.forEach((m, i) => {
    const dot = el("circle", { cx: pad.l + i * slot + slot / 2, cy: y(m.started || 0), r: 2.2, fill: "#7aa7ff" });
    const title = el("title", {});
    title.textContent = `${minuteLabel(m.t)}: ${m.started || 0} started`;
    dot.append(title);
    svg.append(dot);
  });
  for (const i of [0, Math.floor((n - 1) / 2), n - 1]) {
    const label = el("text", { x: pad.l + i * slot + slot / 2, y: height - 3, "text-anchor": i === n - 1 ? "end" : "middle" });
    label.textContent = i === n - 1 ? "now" : `−${n - 1 - i}m`;
    svg.append(label);
  }
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function formatTick(v) {
  return v >= 1000 ? `${(v / 1000).toFixed(1)}k` : String(Math.round(v * 10) / 10);
}

function minuteLabel(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "" : `${String(d.getUTCHours()).padStart(2, "0")}:${String(d.getUTCMinutes()).padStart(2, "0")}`;
}
