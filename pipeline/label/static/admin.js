"use strict";
// The admin page: campaign progress and the per-annotator audit, refreshed every 10 s.

const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const opt = { credentials: "same-origin", method: body === undefined ? "GET" : "POST" };
  if (body !== undefined) {
    opt.headers = { "content-type": "application/json" };
    opt.body = JSON.stringify(body);
  }
  const r = await fetch(path, opt);
  let data = null;
  try {
    data = await r.json();
  } catch (e) {
    data = null;
  }
  if (!r.ok) {
    const err = new Error((data && data.detail) || r.statusText || "request failed");
    err.status = r.status;
    throw err;
  }
  return data;
}

const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
const num = (x, d = 1) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const when = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "–");

function card(title, value, note) {
  const div = document.createElement("div");
  div.className = "card";
  const v = document.createElement("div");
  v.className = "value";
  v.textContent = value;
  const t = document.createElement("div");
  t.className = "title";
  t.textContent = title;
  div.append(v, t);
  if (note) {
    const n = document.createElement("div");
    n.className = "note";
    n.textContent = note;
    div.append(n);
  }
  return div;
}

// An online loop's campaign (stages.online with people's feedback): the round being labelled, its
// progress, and a button that closes it now (the loop then trains on the labels it has).
function renderRound(r) {
  $("round").hidden = !r;
  if (!r) return;
  $("round-title").textContent = `Online round ${r.round}${r.closed ? " (closed)" : ""}`;
  const parts = [
    `${r.complete} / ${r.items} items have ${r.per_item} label(s)`,
    `${r.started} started`,
    `${r.decisive_labels} decisive label(s)`,
    `opened ${when(r.opened_at)}`,
  ];
  if (r.deadline) parts.push(`deadline ${when(r.deadline)}`);
  if (r.closed) parts.push(`closed ${when(r.closed_at)} (${r.closed_by})`);
  $("round-text").textContent = parts.join(" · ");
  const btn = $("close-round");
  btn.hidden = r.closed;
  btn.disabled = r.decisive_labels === 0;
  btn.title = r.decisive_labels === 0 ? "no label yet: nothing to train on" : "";
  btn.dataset.round = String(r.round);
}

$("close-round").addEventListener("click", async () => {
  $("round-error").textContent = "";
  try {
    await api("api/admin/close-round", { round: Number($("close-round").dataset.round) });
  } catch (e) {
    $("round-error").textContent = e.message;
  }
  refresh();
});

function render(s) {
  renderRound(s.round);
  const c = s.choices || {};
  $("cards").replaceChildren(
    card("items complete", `${s.complete} / ${s.items}`, `${s.per_item} labels each · ${s.started} started`),
    card("labels", String(s.labels), `${c.image || 0} choices · ${c.tie || 0} ties · ${c.skip || 0} skips`),
    card("Krippendorff's alpha", num(s.alpha, 3), "nominal; 1 = full agreement, 0 = chance"),
    card("median time per label", s.median_s === null ? "–" : `${num(s.median_s, 2)} s`, ""),
    card("check items", String(s.check_items), "known answers, shown to everyone"),
  );
  const body = $("annotators").tBodies[0];
  body.replaceChildren();
  s.annotators.forEach((a, i) => {
    const tr = document.createElement("tr");
    if (a.agreement !== null && a.agreement < 0.5 && !a.few_labels) tr.className = "flag";
    const cells = [
      String(i + 1), a.annotator, String(a.user_id), String(a.labels), String(a.ties), String(a.skips),
      pct(a.agreement), String(a.compared),
      a.checks ? `${pct(a.check_accuracy)} of ${a.checks}` : "–",
      pct(a.left_share), num(a.median_s, 2), when(a.last_label_at),
    ];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    body.append(tr);
  });
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function refresh() {
  try {
    render(await api("api/admin/summary"));
  } catch (e) {
    if (e.status === 401 || e.status === 403) {
      $("signin-error").textContent = e.message;
      $("board").hidden = true;
      $("signin").hidden = false;
      return false;
    }
    $("updated").textContent = `not updated: ${e.message}`;
  }
  return true;
}

async function start() {
  const m = location.hash.match(/token=([A-Za-z0-9_-]+)/);
  if (m) {
    history.replaceState(null, "", location.pathname + location.search);
    try {
      await api("api/signin", { token: m[1] });
    } catch (e) {
      $("signin-error").textContent = e.message;
    }
  }
  let me;
  try {
    me = await api("api/me");
  } catch (e) {
    $("signin").hidden = false;
    return;
  }
  $("who").textContent = `signed in as ${me.name} (${me.role})`;
  $("signin").hidden = true;
  $("board").hidden = false;
  if (await refresh()) setInterval(refresh, 10000);
}

$("signin-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    await api("api/signin", { token: $("token").value.trim() });
    $("token").value = "";
    $("signin-error").textContent = "";
    start();
  } catch (err) {
    $("signin-error").textContent = err.message;
  }
});
start();
