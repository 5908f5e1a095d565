// The status page: draws /api/v1/status, follows /api/v1/events and redraws
// when something happens (progress moves the bar at once). Text from the
// daemon (file names are anyone's) only ever goes into textContent.
"use strict";

let snapshot = null;
let redrawSoon = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function took(ms) {
  if (ms === undefined || ms === null) return "";
  return ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(1) + " s";
}

function fill(id, rows, columns, empty) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", empty, "empty");
    td.colSpan = columns;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const c of cells) tr.append(c instanceof Node ? wrap(c) : el("td", c));
    body.append(tr);
  }
}

function wrap(node) {
  if (node.tagName === "TD") return node;
  const td = el("td");
  td.append(node);
  return td;
}

function progress(f) {
  const box = el("span");
  const bar = el("span", null, "bar");
  const inner = el("div");
  const pct = f.total ? Math.min(100, (100 * f.bytes) / f.total) : 0;
  inner.style.width = pct.toFixed(1) + "%";
  bar.append(inner);
  box.append(bar, " ", el("span", f.total ? bytes(f.bytes) + " / " + bytes(f.total) : ""));
  box.dataset.key = f.file + "\u0000" + f.host;
  return box;
}

function draw(s) {
  snapshot = s;
  const q = s.queue;
  document.getElementById("summary").textContent =
    `${q.in_flight} in flight · ${q.pending} packages pending · ${q.waiting} waiting · ` +
    `${q.retries} retries waiting · ${s.parked.length} parked · up ${s.uptime_s} s · pid ${s.pid} · ${s.version}`;
  document.getElementById("n-flight").textContent = s.in_flight.length;
  document.getElementById("n-parked").textContent = s.parked.length;
  fill("flight", s.in_flight.map(f => [f.file, f.host, el("td", f.step, "step"), progress(f),
    f.attempt || "", took(f.elapsed_ms)]), 6, "nothing in flight");
  fill("parked", s.parked.map(p => [p.file, p.host, p.error || p.reason,
    el("pre", p.output_tail || "")]), 4, "nothing parked");
  const state = s.host_state || {};
  const names = [...new Set([...Object.keys(s.hosts), ...Object.keys(state)])].sort();
  fill("hosts", names.map(h => {
    const r = s.hosts[h] || {};
    const hs = state[h] || {};
    return [h, el("td", r.state || "", r.state), r.file || "", r.at || "",
      hs.release || "", hs.lock ? "held by " + hs.lock : "free"];
  }), 6, "no result yet");
  fill("recent", s.recent.map(r => [r.at, r.file, r.host, el("td", r.state, r.state),
    r.transport || "", bytes(r.bytes), took(r.elapsed_ms), r.error || ""]), 8, "no result yet");
}

async function refresh() {
  redrawSoon = null;
  try {
    const r = await fetch("/api/v1/status", { cache: "no-store" });
    if (r.ok) draw(await r.json());
  } catch (e) {
    document.getElementById("summary").textContent = "cannot reach the daemon: " + e;
  }
}

function soon() {
  if (!redrawSoon) redrawSoon = setTimeout(refresh, 200);
}

function onEvent(msg) {
  let e;
  try { e = JSON.parse(msg.data); } catch (_) { return; }
  if (e.event === "progress" && snapshot) {
    for (const f of snapshot.in_flight) {
      if (f.file === e.file && f.host === e.host) { f.bytes = e.bytes; f.total = e.total; }
    }
    for (const box of document.querySelectorAll("#flight [data-key]")) {
      if (box.dataset.key === e.file + "\u0000" + e.host) {
        const f = snapshot.in_flight.find(x => x.file === e.file && x.host === e.host);
        if (f) box.replaceWith(progress(f));
      }
    }
    return;
  }
  soon();
}

function follow() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/v1/events");
  es.onopen = () => { live.textContent = "live"; live.className = "on"; soon(); };
  es.onmessage = onEvent;
  es.addEventListener("reset", soon);
  es.onerror = () => { live.textContent = "reconnecting"; live.className = "off"; };
}

refresh();
follow();
setInterval(refresh, 30000);
