"use strict";
// The annotator's page: shows one item (a caption and 2 or K images), takes a choice by click or key,
// moves on at once and sends the label in the background. Labels wait in localStorage until the
// server acknowledged them (a retry reuses the submission id, so it is never stored twice); the next
// item is fetched and its images loaded while the current one is on screen.

const $ = (id) => document.getElementById(id);
const S = {
  me: null,
  current: null, // the item on screen
  queue: [], // items fetched and preloaded, not yet shown
  answered: new Set(), // item keys answered in this page's life
  shownAt: 0,
  ready: false, // the current item's images are loaded: choices are taken
  exhausted: false,
  refilling: false,
  flushing: false,
  retryTimer: null,
  progress: null, // the annotator's and the campaign's counts, from the server
};

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

function newId() {
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

function show(id) {
  for (const s of ["signin", "labeller", "done"]) $(s).hidden = s !== id;
}

function notice(text) {
  $("notice").textContent = text;
}

// -- labels not yet acknowledged ------------------------------------------------------------
function pendingKey() {
  return "label.pending." + (S.me ? S.me.name : "");
}
function pending() {
  try {
    return JSON.parse(localStorage.getItem(pendingKey()) || "[]");
  } catch (e) {
    return [];
  }
}
function setPending(list) {
  localStorage.setItem(pendingKey(), JSON.stringify(list));
  $("sync").textContent = list.length ? `${list.length} label(s) sending…` : "all labels saved";
}

async function flush() {
  if (S.flushing) return;
  S.flushing = true;
  try {
    for (;;) {
      const list = pending();
      if (!list.length) break;
      const lab = list[0];
      try {
        const r = await api("api/label", lab);
        if (S.progress && !r.duplicate) {
          S.progress.labelled_by_you += 1;
          renderProgress(S.progress);
        }
      } catch (e) {
        if (e.status === 401) {
          // signed out (cookie gone): keep the label, it goes out after signing in again
          S.flushing = false;
          return start();
        }
        if (!e.status || e.status >= 500 || e.status === 429) {
          // the server is unreachable or busy: keep the label and try again shortly
          $("sync").textContent = `${list.length} label(s) waiting for the server…`;
          clearTimeout(S.retryTimer);
          S.retryTimer = setTimeout(flush, 2000);
          return;
        }
        notice(`A label was refused: ${e.message}`);
        S.answered.delete(lab.item);
      }
      setPending(pending().filter((x) => x.submission_id !== lab.submission_id));
    }
  } finally {
    S.flushing = false;
  }
  refill();
}

// -- items ----------------------------------------------------------------------------------
function preload(item) {
  for (const im of item.images) {
    const img = new Image();
    img.src = im.url;
  }
}

async function refill() {
  if (S.refilling || !S.me) return;
  const want = S.me.preload + 1;
  if ((S.current ? 1 : 0) + S.queue.length >= want) return;
  S.refilling = true;
  try {
    // items whose labels are still on their way are still open on the server: ask beyond them
    const r = await api("api/next", { n: Math.min(16, want + pending().length) });
    for (const it of r.items) {
      const known =
        S.answered.has(it.key) || (S.current && S.current.key === it.key) || S.queue.some((q) => q.key === it.key);
      if (known) continue;
      S.queue.push(it);
      preload(it);
    }
    S.exhausted = r.items.length === 0;
    renderProgress(r.progress);
  } catch (e) {
    if (e.status === 401) return start();
    notice(`Could not fetch items: ${e.message}`);
  } finally {
    S.refilling = false;
  }
  // with nothing new (only items whose labels are still on their way), the next flush refills
  if (!S.current && (S.queue.length || S.exhausted)) showNext();
}

function renderProgress(p) {
  if (!p) return;
  S.progress = p;
  $("progress").textContent = `you: ${p.labelled_by_you} labelled · campaign: ${p.items_left} of ${p.items} items still need labels`;
}

function buttonsFor(item) {
  const b = [];
  if (item.kind === "pair") {
    b.push(["1", "Left is better", () => chooseAt(0)]);
    b.push(["0", "Tie", () => choose("tie")]);
    b.push(["2", "Right is better", () => chooseAt(1)]);
  } else {
    item.images.forEach((_, pos) => b.push([String(pos + 1), `#${pos + 1} is best`, () => chooseAt(pos)]));
    b.push(["0", "All equal", () => choose("tie")]);
  }
  b.push(["Space", "Skip (can't judge)", () => choose("skip")]);
  return b;
}

function showNext() {
  S.current = S.queue.shift() || null;
  S.ready = false;
  const stage = $("stage");
  stage.dataset.ready = "0";
  stage.replaceChildren();
  $("buttons").replaceChildren();
  if (!S.current) {
    if (S.exhausted && !pending().length) {
      stage.dataset.item = "";
      show("done");
    } else {
      $("caption").textContent = "loading…";
      refill();
    }
    return;
  }
  show("labeller");
  const item = S.current;
  stage.dataset.item = item.key;
  stage.className = "stage k" + item.images.length;
  $("caption").textContent = item.caption; // text, never HTML
  const loads = item.images.map((im, pos) => {
    const fig = document.createElement("figure");
    fig.dataset.index = String(im.index);
    const img = document.createElement("img");
    img.alt = `image ${pos + 1}`;
    img.src = im.url;
    img.addEventListener("click", () => chooseAt(pos));
    const cap = document.createElement("figcaption");
    cap.textContent = String(pos + 1);
    fig.append(img, cap);
    stage.append(fig);
    return img.decode().catch(() => null);
  });
  for (const [key, text, fn] of buttonsFor(item)) {
    const btn = document.createElement("button");
    btn.type = "button";
    btn.dataset.key = key;
    const kbd = document.createElement("kbd");
    kbd.textContent = key;
    btn.append(kbd, document.createTextNode(" " + text));
    btn.addEventListener("click", fn);
    $("buttons").append(btn);
  }
  $("help").textContent =
    item.kind === "pair"
      ? "Keys: 1 left · 2 right · 0 tie · space skip (or click an image)"
      : `Keys: 1-${item.images.length} pick the best · 0 all equal · space skip (or click an image)`;
  Promise.all(loads).then(() => {
    if (S.current !== item) return;
    S.ready = true;
    S.shownAt = performance.now();
    stage.dataset.ready = "1";
  });
  refill();
}

function chooseAt(pos) {
  if (!S.current || pos >= S.current.images.length) return;
  choose(String(S.current.images[pos].index));
}

function choose(choice) {
  const item = S.current;
  if (!item || !S.ready) return; // nothing on screen yet: a judgement needs the images
  S.ready = false;
  const label = {
    item: item.key,
    choice,
    submission_id: newId(),
    duration_ms: Math.max(0, Math.round(performance.now() - S.shownAt)),
  };
  S.answered.add(item.key);
  setPending([...pending(), label]);
  notice("");
  showNext();
  flush();
}

document.addEventListener("keydown", (e) => {
  if (e.target instanceof HTMLInputElement || e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;
  if (!S.current) return;
  if (e.key === " ") {
    e.preventDefault();
    choose("skip");
  } else if (e.key === "0") {
    choose("tie");
  } else if (/^[1-9]$/.test(e.key)) {
    chooseAt(Number(e.key) - 1);
  } else if (S.current.kind === "pair" && (e.key === "ArrowLeft" || e.key === "ArrowRight")) {
    chooseAt(e.key === "ArrowLeft" ? 0 : 1);
  }
});

// -- sign-in --------------------------------------------------------------------------------
async function start() {
  const m = location.hash.match(/token=([A-Za-z0-9_-]+)/);
  if (m) {
    history.replaceState(null, "", location.pathname + location.search); // the token leaves the address bar
    try {
      await api("api/signin", { token: m[1] });
    } catch (e) {
      $("signin-error").textContent = e.message;
      show("signin");
      return;
    }
  }
  try {
    S.me = await api("api/me");
  } catch (e) {
    if (e.status !== 401) $("signin-error").textContent = e.message;
    show("signin");
    return;
  }
  if (S.me.role !== "annotator") {
    $("signin-error").textContent = "This is an admin token: the admin page is at admin.";
    show("signin");
    return;
  }
  $("who").textContent = `signed in as ${S.me.name}`;
  renderProgress(S.me.progress);
  for (const lab of pending()) S.answered.add(lab.item); // answered before a reload: not shown again
  setPending(pending());
  await flush(); // labels left from before a reload go first
  await refill();
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
$("again").addEventListener("click", () => {
  S.exhausted = false;
  refill();
});
window.addEventListener("online", flush);
start();
