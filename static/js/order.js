// The order page, live: applies the `/ws/orders/<id>/` websocket's `order` messages
// (docs/LIVE_FEED.md) to the server-rendered page, and cancels through the REST API.
// Without this script the page still works: it shows the state when loaded, and the cancel
// button posts a plain form.
(function () {
  "use strict";

  var root = document.getElementById("order");
  if (!root) return;
  var labels = JSON.parse(document.getElementById("order-labels").textContent);
  var state = JSON.parse(document.getElementById("order-state").textContent);
  var STEP_DONE = { succeeded: true, confirmed: true, skipped: true };
  var FINAL = { shipped: true, rejected: true, cancelled: true };
  var el = function (id) { return document.getElementById(id); };

  // --- Rendering (the same rules as orders/views.py: situation, progress) ---------------------

  function situation(s) {
    var saga = s.saga || {};
    if (saga.state === "compensating") return "undoing";
    if (s.order.status === "approved" && !s.order.can_cancel) {
      return saga.state === "completed" ? "confirmed" : "leaving";
    }
    return s.order.status;
  }

  function progress(s) {
    var steps = (s.saga && s.saga.steps) || [];
    var total = steps.length;
    var done = steps.filter(function (step) { return STEP_DONE[step.state]; }).length;
    var status = s.order.status;
    var sagaState = s.saga && s.saga.state;
    if ((status === "rejected" || status === "cancelled") && sagaState !== "compensating") {
      return { total: total, value: total, tone: "stopped", text: labels.statuses[status] };
    }
    if (sagaState === "compensating") {
      return { total: total, value: done, tone: "undoing", text: "Undoing: " + done + " of " + total + " steps still to undo" };
    }
    if (!total) return { total: 0, value: 0, tone: "active", text: "Starting…" };
    return { total: total, value: done, tone: done === total ? "done" : "active", text: done + " of " + total + " steps done" };
  }

  function setText(node, text) {
    // Only touch what changed, so the live region announces changes, not every message.
    if (node.textContent !== text) node.textContent = text;
  }

  function renderSteps(steps) {
    var list = el("steps");
    var items = steps.map(function (step) {
      var shown = step.shown || step.state; // worded by the server (orders/live.py)
      var li = document.createElement("li");
      li.className = "step step--" + shown;
      li.dataset.step = step.name;
      li.dataset.state = step.state;
      var marker = document.createElement("span");
      marker.className = "step__marker";
      marker.setAttribute("aria-hidden", "true");
      var label = document.createElement("span");
      label.className = "step__label";
      label.textContent = labels.steps[step.name] || step.name.replace(/_/g, " ");
      var stateLabel = document.createElement("span");
      stateLabel.className = "step__state";
      var inProgress = step.state === "running" || step.state === "retrying";
      stateLabel.textContent = (labels.states[shown] || shown) + (inProgress && step.attempts > 1 ? " (attempt " + step.attempts + ")" : "");
      li.append(marker, label, stateLabel);
      return li;
    });
    list.replaceChildren.apply(list, items);
  }

  function render(s) {
    var status = el("order-status");
    status.className = "badge badge--" + s.order.status;
    status.dataset.status = s.order.status;
    setText(status, labels.statuses[s.order.status] || s.order.status);
    setText(el("order-note"), labels.notes[situation(s)] || "");
    var failure = s.order.failure;
    el("order-failure").hidden = !failure || s.order.status === "cancelled";
    setText(el("order-failure-message"), failure ? failure.message : "");

    var p = progress(s);
    var bar = el("progress");
    bar.className = "progress progress--" + p.tone;
    bar.setAttribute("aria-valuemax", String(p.total));
    bar.setAttribute("aria-valuenow", String(p.value));
    bar.setAttribute("aria-valuetext", p.text);
    bar.dataset.value = p.value;
    bar.dataset.total = p.total;
    bar.firstElementChild.style.width = (p.total ? Math.round((100 * p.value) / p.total) : 0) + "%";
    setText(el("progress-text"), p.text);
    renderSteps((s.saga && s.saga.steps) || []);

    var form = el("cancel-form");
    form.hidden = !s.order.can_cancel;
  }

  function apply(message) {
    if (!message || message.type !== "order" || !message.order) return;
    state = message;
    render(state);
  }

  function say(text, level) {
    var box = el("messages");
    var p = document.createElement("p");
    p.className = "message message--" + level;
    p.textContent = text;
    box.replaceChildren(p);
  }

  // --- Re-reading the state: the page itself, rendered by the server ---------------------------
  // Used on every (re)connection attempt and after a cancel: the same state the first paint used,
  // computed by the server, so this script never decides what the order's state is.

  function reread() {
    return fetch(window.location.pathname, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var script = doc.getElementById("order-state");
        if (script) apply(JSON.parse(script.textContent));
      })
      .catch(function () { /* offline: the next attempt will try again */ });
  }

  // --- The websocket, reconnecting with backoff ------------------------------------------------

  var indicator = el("live-indicator");
  var attempt = 0;
  var socket = null;
  var stopped = false;

  function live(on, text) {
    indicator.dataset.live = on ? "on" : "off";
    setText(indicator, text);
  }

  function connect() {
    if (stopped) return;
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    socket = new WebSocket(scheme + window.location.host + root.dataset.wsPath);
    socket.onopen = function () {
      attempt = 0;
      live(true, "Live updates: on");
    };
    socket.onmessage = function (event) {
      try { apply(JSON.parse(event.data)); } catch (e) { /* ignore a malformed message */ }
    };
    socket.onclose = function (event) {
      socket = null;
      if (event.code === 4401 || event.code === 4403 || event.code === 4404) {
        stopped = true;
        live(false, event.code === 4401 ? "Live updates: off (your session ended; log in again)" : "Live updates: off");
        return;
      }
      // Nothing more will change once the order has ended: no need to keep a connection.
      if (FINAL[state.order.status] && state.saga && state.saga.state !== "compensating" && state.saga.state !== "running") {
        live(false, "Live updates: finished");
        return;
      }
      attempt += 1;
      var delay = Math.min(30000, 500 * Math.pow(2, attempt - 1)) * (0.5 + Math.random() / 2);
      live(false, "Live updates: reconnecting…");
      // Whatever happened while disconnected is read again, from the server's rendering.
      reread();
      setTimeout(connect, delay);
    };
  }

  // --- Cancelling: the REST endpoint, with the session's CSRF token ----------------------------

  var form = el("cancel-form");
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var button = el("cancel-button");
    button.disabled = true;
    button.textContent = "Cancelling…";
    var token = form.querySelector("input[name=csrfmiddlewaretoken]").value;
    fetch(root.dataset.cancelApi, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRFToken": token },
      body: "{}",
    })
      .then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (body) {
          return { status: response.status, body: body };
        });
      })
      .then(function (result) {
        button.textContent = "Cancel order";
        button.disabled = false;
        if (result.status === 202) {
          say(labels.requested, "success");
          return reread();
        }
        if (result.status === 409) {
          // Re-read first: a completed saga refuses with `not_cancellable`, and what the customer
          // needs to hear is that the parcel has left (the server words it the same way).
          return reread().then(function () {
            var shipped = result.body.code === "already_shipped" || state.order.status === "shipped";
            say(shipped ? labels.refused_shipped : "Not cancelled: " + (result.body.message || "this order can no longer be cancelled") + ".", "error");
          });
        }
        form.submit(); // anything else: let the server answer with its page
      })
      .catch(function () {
        button.disabled = false;
        button.textContent = "Cancel order";
        form.submit();
      });
  });

  render(state);
  if ("WebSocket" in window) connect();
})();
