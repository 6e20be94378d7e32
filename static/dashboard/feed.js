// The websocket client: connects, reconnects with capped exponential backoff and full jitter,
// and hands every message to `onMessage`. Applying them is the dashboard's job (once per frame).

const CLOSE_NOT_LOGGED_IN = 4401;
const CLOSE_FORBIDDEN = 4403;

export class Feed {
  constructor(path, { onMessage, onStatus, onOpen }) {
    this.url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
    this.onMessage = onMessage;
    this.onStatus = onStatus;
    this.onOpen = onOpen;
    this.failures = 0;
    this.ws = null;
    this.timer = null;
    this.stopped = false;
    this.connections = 0;
  }

  connect() {
    clearTimeout(this.timer);
    if (this.stopped) return;
    this.onStatus(this.connections ? "reconnecting" : "connecting", { failures: this.failures });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.addEventListener("open", () => {
      this.failures = 0;
      this.connections += 1;
      this.onStatus("live", {});
      this.onOpen?.(this.connections > 1);
    });
    ws.addEventListener("message", (event) => {
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        return; // not ours to judge: a broken frame is dropped, the gap check heals it
      }
      this.onMessage(msg);
    });
    ws.addEventListener("close", (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (event.code === CLOSE_NOT_LOGGED_IN || event.code === CLOSE_FORBIDDEN) {
        // Reconnecting would be refused again: say why and stop.
        this.stopped = true;
        this.onStatus("denied", { code: event.code });
        return;
      }
      this.scheduleReconnect();
    });
  }

  scheduleReconnect() {
    this.failures += 1;
    // 0.5 s, 1 s, 2 s ... capped at 15 s; full jitter so a restarted server is not hit by every
    // open dashboard in the same millisecond.
    const ceiling = Math.min(15_000, 500 * 2 ** Math.min(this.failures - 1, 10));
    const delay = 250 + Math.random() * ceiling;
    this.onStatus("offline", { retryInMs: delay, failures: this.failures });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  reconnectNow() {
    if (this.ws || this.stopped) return;
    this.connect();
  }

  send(obj) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  get isOpen() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }
}
