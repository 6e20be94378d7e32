// The service registry in the queues-and-workers panel: one row per registered instance (a
// service hosted by a worker process), live or recently expired, from overview.instances.
import { h } from "./format.js";

function secs(s) {
  if (s == null || !Number.isFinite(s)) return "—";
  if (s < 10) return `${s.toFixed(1)}s`;
  if (s < 120) return `${Math.round(s)}s`;
  if (s < 7200) return `${Math.round(s / 60)}m`;
  return `${Math.round(s / 3600)}h`;
}

export function renderInstances(instances) {
  const list = document.getElementById("instances");
  if (!list) return;
  if (!instances.length) {
    list.replaceChildren(h("li", { class: "none" }, "no instance registered"));
    return;
  }
  list.replaceChildren(
    ...instances.map((i) =>
      h(
        "li",
        {
          class: i.alive ? "instance" : "instance expired",
          "data-instance": i.instance,
          title: [
            `${i.worker} on ${i.host}, pid ${i.pid}`,
            `queues: ${(i.queues || []).join(", ")}`,
            `code ${i.code_version || "?"}`,
            `definitions: ${(i.definitions || []).join("; ") || "—"}`,
          ].join("\n"),
        },
        h("span", { class: i.alive ? "wdot up" : "wdot", role: "img", "aria-label": i.alive ? "live" : "expired" }),
        h("span", { class: "iservice" }, i.service),
        h("span", { class: "iworker" }, i.worker),
        h(
          "span",
          { class: "iages" },
          `pid ${i.pid} · ${i.code_version || "?"} · ${i.alive ? "beat" : "expired, last beat"} ${secs(i.heartbeat_age)} ago` +
            (i.tasks_running ? ` · ${i.tasks_running} running, oldest ${secs(i.oldest_task_age)}` : " · idle"),
        ),
      ),
    ),
  );
}
