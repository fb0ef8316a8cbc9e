// A page whose table and state badge follow the server's live stream (server-sent events of the
// page's state, corral.server.live): each event carries the rows as cells ({text, href, badge,
// class}, drawn as the template's `cell` macro draws them) and the state badge [class, text].
// Values are set as text and attributes, never as markup.

function cellOf(c) {
  const td = document.createElement("td");
  if (c.class) td.className = c.class;
  if (c.href) {
    const a = document.createElement("a");
    a.className = "mono";
    a.href = c.href;
    a.textContent = c.text;
    td.append(a);
  } else if ("badge" in c) {
    const span = document.createElement("span");
    span.className = `badge ${c.badge}`;
    span.textContent = c.text;
    td.append(span);
  } else {
    td.textContent = c.text;
  }
  return td;
}

function rowOf(cells) {
  const tr = document.createElement("tr");
  tr.append(...cells.map(cellOf));
  return tr;
}

const root = document.querySelector("[data-live-rows]");
if (root) {
  const source = new EventSource(root.dataset.liveRows);
  source.addEventListener("state", (event) => {
    const state = JSON.parse(event.data);
    const badge = document.getElementById("live-badge");
    if (badge) {
      badge.className = `badge ${state.badge[0]}`;
      badge.textContent = state.badge[1];
    }
    if (state.rows.length) document.getElementById("live-rows").replaceChildren(...state.rows.map(rowOf));
  });
}
