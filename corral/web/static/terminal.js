// The browser terminal (issue 6): a remote-access session of kind "terminal" on one device.
//
// POST /api/v1/devices/ID/sessions (the console's cookie, with the page's CSRF token) returns a
// single-use token; the session's WebSocket /api/v1/sessions/SID/ws?token=... is authenticated
// by the same cookie. On the socket, binary messages are the PTY's bytes both ways; text messages
// are JSON controls: we send {"type": "resize", cols, rows}; the device sends {"type": "exit",
// code} when the shell ends and {"type": "error", message} when the session fails.
import { createSession, openSocket } from "/static/session.js";
import { openTerminal, setStatus } from "/static/xterm-setup.js";

const container = document.getElementById("terminal");
const statusLine = document.getElementById("term-status");
const { term, fit } = openTerminal(container);
fit.fit();

let ended = false;

function end(text, kind) {
  if (ended) return;
  ended = true;
  setStatus(statusLine, text, kind);
  term.options.cursorBlink = false;
  term.options.disableStdin = true;
}

function connect(session) {
  const ws = openSocket(session);
  const encoder = new TextEncoder();
  const send = (data) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(data);
  };
  const sendSize = () => send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));

  ws.addEventListener("open", () => {
    setStatus(statusLine, `Connected (session ${session.id}).`, "ok");
    term.focus();
  });
  ws.addEventListener("message", (event) => {
    if (typeof event.data !== "string") {
      term.write(new Uint8Array(event.data));
      return;
    }
    let control;
    try {
      control = JSON.parse(event.data);
    } catch {
      return;
    }
    if (control.type === "exit") {
      end(`The shell exited with status ${control.code}.`, control.code === 0 ? "ok" : "warn");
      ws.close();
    } else if (control.type === "error") {
      end(`Session ended: ${control.message}`, "error");
    }
  });
  ws.addEventListener("close", (event) => {
    end(event.code === 1000 || event.code === 1005 ? "The session ended." :
      `The session closed (${event.code}${event.reason ? ": " + event.reason : ""}).`, "warn");
  });
  term.onData((data) => send(encoder.encode(data)));
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0))));
  term.onResize(sendSize);
  window.addEventListener("resize", () => fit.fit());
}

createSession(container.dataset.device, container.dataset.csrf, "terminal", { cols: term.cols, rows: term.rows })
  .then(connect, (error) => end(`Could not open a terminal: ${error.message}`, "error"));
