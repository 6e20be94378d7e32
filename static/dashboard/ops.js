// Operations panels: alert notifications with their deliveries, and stock contention (lock
// conflicts per SKU as the inventory service recorded them). Both come with each overview.

import { fmtNumber, h, human } from "./format.js";

const $ = (id) => document.getElementById(id);

export function renderOps(o) {
  if (o.alerting) renderAlerts(o.alerting);
  if (o.contention) renderContention(o.contention);
}

function renderAlerts(groups) {
  $("alerts-empty").hidden = groups.length > 0;
  $("alert-groups").replaceChildren(
    ...groups.map((g) => {
      const deliveries = Object.entries(g.deliveries || {}).map(([state, n]) => `${n} ${state}`).join(" · ") || "no channel";
      return h(
        "li",
        { class: "ops-alert", dataset: { status: g.status, severity: g.severity }, title: g.summary },
        h("span", { class: "ops-sev" }, g.status === "resolved" ? "resolved" : g.severity),
        h("a", { class: "ops-name", href: `/admin/orchestration/alertgroup/${g.id}/change/` }, g.summary),
        h("span", { class: "ops-sub" }, `${human(g.rule)} · ${fmtNumber(g.count)} affected · deliveries: ${deliveries}`),
      );
    }),
  );
}

function renderContention(c) {
  const minutes = c.minutes || [];
  const total = minutes.reduce((s, m) => s + m.conflicts, 0);
  $("contention-total").textContent = `${fmtNumber(c.conflicts_per_min, 1)} conflicts/min · ${fmtNumber(c.exhausted_15m)} gave up`;
  $("contention-empty").hidden = total > 0 || (c.hottest || []).length > 0;
  const max = Math.max(1, ...minutes.map((m) => m.conflicts));
  const w = 150 / Math.max(1, minutes.length);
  $("contention-chart").replaceChildren(
    ...minutes.map((m, i) => {
      const bar = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      const height = (28 * m.conflicts) / max;
      bar.setAttribute("x", String(i * w + 0.5));
      bar.setAttribute("y", String(30 - height));
      bar.setAttribute("width", String(Math.max(1, w - 1)));
      bar.setAttribute("height", String(height));
      bar.setAttribute("class", m.exhausted ? "hot" : "");
      const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
      title.textContent = `${m.t.slice(11, 16)}: ${m.conflicts} conflicts, ${m.retries} retries, ${m.exhausted} gave up`;
      bar.append(title);
      return bar;
    }),
  );
  $("contention-skus").replaceChildren(
    ...(c.hottest || []).map((s) =>
      h(
        "li",
        { class: "ops-sku", dataset: { sku: s.sku } },
        h("span", { class: "ops-name" }, s.sku),
        h("span", { class: "ops-sub" }, `${fmtNumber(s.conflicts)} conflicts · ${fmtNumber(s.reservations)} reservations · ${fmtNumber(s.exhausted)} out of attempts (5 min)`),
      ),
    ),
  );
}
