"""``GET /``: the live status page, one self-contained HTML document (no assets, no build).

Its script fetches ``/tree`` and ``/readyz`` every few seconds and redraws the tree with
``textContent`` only (service names are text, never markup).
"""

from __future__ import annotations

__all__ = ["PAGE", "REFRESH_SECONDS"]

#: How often the page refreshes itself.
REFRESH_SECONDS = 2

PAGE = (
    """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>anyservice status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .3em; }
  #banner { padding: .4em .8em; border-radius: 4px; display: inline-block; }
  .ready { background: #d9f2d9; } .notready { background: #fde2c8; } .down { background: #f8d0d0; }
  ul { list-style: none; padding-left: 1.3em; border-left: 1px solid #ccc; margin: .2em 0; }
  #tree > ul { border-left: none; padding-left: 0; }
  .service { margin: .3em 0; }
  .name { font-weight: 600; }
  .state { font-family: monospace; padding: 0 .4em; border-radius: 3px; margin-left: .4em; }
  .RUNNING { background: #d9f2d9; } .CRASHED { background: #f8d0d0; }
  .STARTING, .STOPPING, .INIT { background: #fdf0c8; } .STOPPED { background: #e4e4e4; }
  .detail { color: #555; font-size: .92em; margin-left: .6em; }
  table { border-collapse: collapse; margin: .2em 0 .2em .6em; font-size: .9em; }
  td, th { border: 1px solid #ddd; padding: .1em .5em; text-align: right; }
  th:first-child, td:first-child { text-align: left; }
</style>
</head>
<body>
<h1>anyservice status</h1>
<p><span id="banner">loading…</span> <span id="updated" class="detail"></span></p>
<div id="tree"></div>
<script>
"use strict";
const REFRESH_MS = """
    + str(REFRESH_SECONDS * 1000)
    + """;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function ms(seconds) { return (seconds * 1000).toFixed(2) + " ms"; }

function timers(node) {
  const names = Object.keys(node.timers);
  if (names.length === 0) return null;
  const table = el("table", "timers");
  const head = el("tr");
  for (const title of ["timer", "ticks", "mean late", "worst late", "overruns", "missed"]) {
    head.appendChild(el("th", "", title));
  }
  table.appendChild(head);
  for (const name of names) {
    const t = node.timers[name];
    const row = el("tr");
    for (const value of [name, t.ticks, ms(t.mean_lateness), ms(t.worst_lateness),
                         t.overruns, t.missed]) {
      row.appendChild(el("td", "", value));
    }
    table.appendChild(row);
  }
  return table;
}

function service(node) {
  const item = el("li", "service");
  item.dataset.service = node.name;
  item.appendChild(el("span", "name", node.name));
  item.appendChild(el("span", "state " + node.state, node.state));
  const details = ["restarts=" + node.restarts];
  if (node.health) {
    const health = node.health.healthy ? "ok" : "UNHEALTHY (" + node.health.reason + ")";
    details.push("health=" + health);
  }
  if (node.flags.length) details.push("flags=" + node.flags.join(","));
  if (node.crash) details.push("crash=" + node.crash);
  if (node.task_worker) {
    const w = node.task_worker;
    details.push("runs in flight=" + w.current + "/" + (w.limit === null ? "∞" : w.limit));
    details.push(Object.entries(w.counts).map(([k, v]) => k + "=" + v).join(" "));
  }
  item.appendChild(el("span", "detail", details.join(" · ")));
  const table = timers(node);
  if (table) item.appendChild(table);
  if (node.children.length) {
    const list = el("ul");
    for (const child of node.children) list.appendChild(service(child));
    item.appendChild(list);
  }
  return item;
}

async function refresh() {
  const banner = document.getElementById("banner");
  try {
    const [tree, ready] = await Promise.all([
      fetch("tree", {cache: "no-store"}).then((r) => r.json()),
      fetch("readyz", {cache: "no-store"}).then((r) => r.json()),
    ]);
    const list = el("ul");
    list.appendChild(service(tree));
    document.getElementById("tree").replaceChildren(list);
    banner.className = ready.ready ? "ready" : "notready";
    banner.textContent = ready.ready ? "ready" : "not ready: " + ready.reasons.join("; ");
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (error) {
    banner.className = "down";
    banner.textContent = "no answer from the service: " + error;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
</script>
</body>
</html>
"""
)
