// The dashboard's live figures: the server sends the dashboard's whole state as a server-sent
// event whenever it changes (/dashboard/live, corral.server.live); this module puts it into the
// page. Text only ever goes in as text (textContent), never as markup.

const status = document.getElementById("live-status");

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function setText(id, value) {
  const node = document.getElementById(id);
  if (node && node.textContent !== String(value)) node.textContent = String(value);
}

function fillBody(table, rows, emptyText, columns, render) {
  const body = table.querySelector("tbody");
  const fresh = rows.length ? rows.map(render)
    : [el("tr", {}, el("td", {colspan: columns, class: "muted"}, emptyText))];
  body.replaceChildren(...fresh);
}

function versionRow(v) {
  const name = v.href ? el("a", {class: "mono", href: v.href}, v.version) : el("span", {class: "mono"}, v.version);
  const bar = el("progress", {max: 100, value: v.percent, "aria-label": `${v.version}: ${v.percent}% of the devices`});
  return el("tr", {}, el("td", {}, name), el("td", {class: "num"}, v.count),
            el("td", {class: "share"}, bar, " ", el("span", {}, `${v.percent}%`)));
}

function versionsTable(id, caption, rows) {
  const head = el("tr", {}, el("th", {scope: "col"}, "Version"), el("th", {scope: "col", class: "num"}, "Devices"),
                  el("th", {scope: "col"}, el("span", {class: "visually-hidden"}, "Share")));
  const table = el("table", {class: "versions", id}, el("caption", {}, caption), el("thead", {}, head),
                   el("tbody", {}, ...rows.map(versionRow)));
  return el("div", {class: "table-wrap"}, table);
}

function alertItem(a) {
  const item = el("li", {}, el("a", {href: "/alerts"}, a.alert), " ",
                  el("span", {class: a.severity === "critical" ? "badge crit" : "badge warn"}, a.severity), " ",
                  el("span", {class: "mono"}, a.key));
  if (a.since) item.append(" ", el("span", {class: "muted"}, "since ", el("time", {datetime: a.since}, a.since_text)));
  return item;
}

function rolloutRow(r) {
  const bar = el("progress", {max: 100, value: r.percent,
                              "aria-label": `rollout ${r.id}: ${r.done} of ${r.total} devices done`});
  const counts = `${r.done} / ${r.total}` + (r.failed ? `, ${r.failed} failed` : "");
  return el("tr", {},
    el("td", {}, el("a", {class: "mono", href: `/rollouts/${encodeURIComponent(r.id)}`}, r.id)),
    el("td", {class: "mono"}, r.artifact),
    el("td", {}, el("span", {class: r.status === "paused" ? "badge warn" : "badge ok"}, r.status)),
    el("td", {class: "nowrap"}, `${r.wave} of ${r.waves}`),
    el("td", {class: "share"}, bar, " ", el("span", {}, counts)));
}

// A section is rebuilt only when its own data changed, so that a link the keyboard is on keeps its
// focus while other figures move.
const shown = new Map();
function changed(key, value) {
  const text = JSON.stringify(value);
  if (shown.get(key) === text) return false;
  shown.set(key, text);
  return true;
}

function show(state) {
  setText("fig-online", state.online);
  setText("fig-offline", state.offline);
  setText("fig-pending", state.pending);
  setText("fig-firing", state.firing);
  setText("fig-points", state.points_per_minute);
  document.getElementById("fig-firing-box").classList.toggle("firing", state.firing > 0);
  if (changed("agent", state.agent_versions)) {
    fillBody(document.getElementById("agent-versions"), state.agent_versions, "No devices yet.", 3, versionRow);
  }
  if (changed("os", state.os_versions)) {
    fillBody(document.getElementById("os-versions"), state.os_versions, "No devices yet.", 3, versionRow);
  }
  if (changed("software", state.software)) {
    document.getElementById("software").replaceChildren(
      ...state.software.map((s, i) => versionsTable(`software-${i + 1}`, s.component, s.versions)));
  }
  if (changed("alerts", state.alerts)) {
    const alerts = document.getElementById("alerts-list");
    alerts.replaceChildren(...(state.alerts.length ? state.alerts.map(alertItem)
      : [el("li", {class: "muted"}, "No alert is firing.")]));
  }
  if (changed("rollouts", state.rollouts)) {
    fillBody(document.getElementById("rollouts"), state.rollouts, "No rollout is running.", 5, rolloutRow);
  }
}

function say(text, kind) {
  if (status.textContent !== text) status.textContent = text;
  status.className = `status ${kind}`;
}

const source = new EventSource(status.dataset.liveUrl);
source.addEventListener("open", () => say("Live: the figures update by themselves.", "ok"));
source.addEventListener("error", () => {
  if (source.readyState === EventSource.CLOSED) say("Live updates stopped: reload the page.", "error");
  else say("Live updates interrupted: reconnecting…", "warn");
});
source.addEventListener("state", (e) => {
  const state = JSON.parse(e.data);
  if (state.signed_out) {
    source.close();
    say("You are signed out: reload the page to log in again.", "error");
    return;
  }
  show(state);
  document.body.dataset.liveEvents = String(Number(document.body.dataset.liveEvents || 0) + 1);
});
