"""The labelling page in a real browser (headless Chromium driven by playwright): sign in by link,
label by mouse and by keyboard, tie and skip, lose the network for two labels, reload half-way and go
on; the export's rows equal the clicks. Also: a caption holding markup shows as text, and the admin
page shows the audit. Screenshots go to the test's folder (and to docs/label/ with
LABEL_SCREENSHOTS=docs/label)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.label.app import create_app
from pipeline.label.assignment import Policy, next_items, record_label
from pipeline.label.export import export
from pipeline.label.people import add_person
from pipeline.label.sources import load_source
from pipeline.label.storage import Database, load_items
from tools.label_servers import free_port
from tools.toy.make_pickapic import make_rows, write_parquet

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CAPTION = "<script>window.__pwned = 1</script><b>a bold</b> red & blue castle"


def _why_no_browser() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM}: make test installs Debian's chromium (apt-get, as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]'"
    return None


# a browser and a server process: the slow tier
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_why_no_browser() is not None, reason=str(_why_no_browser())),
]


class _Server:
    """uvicorn serving the app in a thread of the test process, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def browser():
    """Chromium with a fresh temporary profile (playwright's launch makes one and deletes it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _page(browser):
    """A page in its own context: its own cookies and localStorage, as another person's browser."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(120_000)  # generous: the machine may be busy with other work
    return ctx.new_page()


def _shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    docs = os.environ.get("LABEL_SCREENSHOTS")
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(docs) / name)


def _wait_item(page, previous: str | None) -> str:
    """Wait until a new item is on screen with its images loaded; return its key ('' when done)."""
    page.wait_for_function(
        """prev => { const s = document.getElementById('stage');
                     const done = !document.getElementById('done').hidden;
                     return done || (s.dataset.ready === '1' && s.dataset.item !== prev); }""",
        arg=previous or "",
        timeout=120_000,
    )
    return page.eval_on_selector(
        "#stage", "s => document.getElementById('done').hidden ? s.dataset.item : ''"
    )


def test_label_by_mouse_and_keyboard_reload_and_export(browser, tmp_path):
    rows = make_rows(12, seed=11, tie_rate=0, unlabelled_rate=0, identical_rate=0)
    rows[0]["caption"] = CAPTION
    write_parquet(rows, tmp_path / "src", rows_per_file=12)
    db = Database(str(tmp_path / "labels.db"))
    src = load_source(str(tmp_path / "src"), shuffle=False, checks=2, check_column="true_label_0")
    load_items(db, src.items, src.fingerprint, "src")
    _, token = add_person(db, "alice")
    _, admin_token = add_person(db, "boss", "admin")
    others = {n: add_person(db, n)[0].id for n in ("bob", "dan", "carl")}
    items = {it.key: it for it in src.items}
    pol = Policy(per_item=4, lease_s=600, check_every=5)
    page = _page(browser)
    with _Server(create_app(db, pol, preload=1)) as url:
        page.goto(f"{url}/#token={token}")
        key = _wait_item(page, None)
        assert "token" not in page.url  # the token left the address bar
        # the markup in the caption is text: shown verbatim, never run or parsed
        assert key == src.items[0].key
        assert page.inner_text("#caption") == CAPTION
        assert page.evaluate("window.__pwned") is None and page.query_selector("#caption b") is None
        assert "signed in as alice" in page.inner_text("#who")

        def displayed() -> list[int]:
            return [
                int(x)
                for x in page.eval_on_selector_all("#stage figure", "fs => fs.map(f => f.dataset.index)")
            ]

        # (how, expected choice as a function of the displayed order)
        actions = [
            ("click-left", lambda d: str(d[0])),
            ("key-2", lambda d: str(d[1])),
            ("click-tie", lambda d: "tie"),
            ("key-0", lambda d: "tie"),
            ("key-space", lambda d: "skip"),
            ("click-right", lambda d: str(d[1])),
            ("offline:key-1", lambda d: str(d[0])),  # label requests fail: kept in localStorage
            ("offline:click-skip", lambda d: "skip"),
            ("reload", None),  # half-way, with two labels still unsent
            ("key-1", lambda d: str(d[0])),
            ("click-left", lambda d: str(d[0])),
            ("key-ArrowRight", lambda d: str(d[1])),
        ]
        done = []  # (item key, choice) in the order given
        for how, expect in actions:
            if how == "reload":
                page.reload()
                page.unroute("**/api/label")  # the network is back: the stored labels go first
                key = _wait_item(page, None)
                continue
            if how.startswith("offline:"):
                page.route("**/api/label", lambda route: route.abort())
                how = how.split(":", 1)[1]
            done.append((key, expect(displayed())))
            kind, what = how.split("-", 1)
            if kind == "key":
                page.keyboard.press({"space": "Space"}.get(what, what))
            elif what in ("left", "right"):
                page.click(f"#stage figure:nth-child({1 if what == 'left' else 2}) img")
            else:
                page.click(f"#buttons button[data-key='{ {'tie': '0', 'skip': 'Space'}[what] }']")
            key = _wait_item(page, key)
            if len(done) == 2:
                _shot(page, tmp_path, "labeller.png")
        page.wait_for_function("() => document.getElementById('sync').textContent === 'all labels saved'")
        assert page.evaluate("localStorage.getItem('label.pending.alice')") == "[]"

        # the export's rows are the clicks, in order, once each
        s = export(db, tmp_path / "export")
        table = pq.read_table(tmp_path / "export" / s["files"][0]).to_pylist()
        assert [(r["item_key"], r["choice"]) for r in table] == done
        assert len({k for k, _ in done}) == len(done)  # never the same item twice
        assert all(r["annotator"] == "alice" and r["duration_ms"] > 0 for r in table)
        by_uid = {r["image_0_uid"]: r for r in rows}
        for r in table:
            exp = {"tie": (0.5, 0.5), "skip": (0.0, 0.0), "0": (1.0, 0.0), "1": (0.0, 1.0)}[r["choice"]]
            assert (r["label_0"], r["label_1"]) == exp
            assert (r["jpg_0"], r["jpg_1"]) == (
                by_uid[r["image_0_uid"]]["jpg_0"],
                by_uid[r["image_0_uid"]]["jpg_1"],
            )

        # three more annotators through the API, two following the truth and one against it on purpose:
        # whatever alice chose, carl is against the majority of the others on every item, so first
        for who, flip in (("bob", False), ("dan", False), ("carl", True)):
            for it in next_items(db, others[who], 16, pol):
                good = 0 if items[it["key"]].meta["true_label_0"] == 1.0 else 1
                record_label(
                    db, others[who], it["key"], str(1 - good if flip else good), uuid.uuid4().hex, 1500
                )
        admin = _page(browser)
        admin.goto(f"{url}/admin#token={admin_token}")
        admin.wait_for_selector("#annotators tbody tr")
        names = admin.eval_on_selector_all(
            "#annotators tbody tr td:nth-child(2)", "tds => tds.map(t => t.textContent)"
        )
        assert names[0] == "carl" and set(names) == {"alice", "bob", "dan", "carl"}
        assert "Krippendorff" in admin.inner_text("#cards")
        _shot(admin, tmp_path, "admin.png")
        # an annotator's token on the admin page is refused; an admin token cannot label
        page.goto(f"{url}/admin")  # alice's cookie
        page.wait_for_function(
            "() => document.getElementById('signin-error').textContent.includes('admin token')"
        )
        assert page.is_hidden("#board")
        admin.goto(f"{url}/")  # boss's cookie
        admin.wait_for_function(
            "() => document.getElementById('signin-error').textContent.includes('admin token')"
        )
        assert admin.is_hidden("#labeller")


def test_the_admin_page_shows_an_online_round_and_closes_it(browser, tmp_path):
    """An online loop's campaign: the admin page shows the round, its progress and deadline; "Close
    this round now" is disabled until the round has a label, then closes it (who closed it shown)."""
    from PIL import Image

    from pipeline.label import rounds

    folder = tmp_path / "round_000" / "sample"
    (folder / "images").mkdir(parents=True)
    recs = []
    for p in range(3):
        for j in range(2):
            Image.new("RGB", (64, 64), (60 * p, 100 * j, 30)).save(folder / "images" / f"g{p}_{j}.jpg")
            recs.append(
                {
                    "image_key": f"g{p}/{j}",
                    "prompt_key": f"g{p}",
                    "caption": f"prompt {p}",
                    "k": j,
                    "file": f"images/g{p}_{j}.jpg",
                }
            )
    (folder / "images.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    db = Database(str(tmp_path / "labels.db"))
    people = {n: add_person(db, n)[0].id for n in ("alice", "bob")}
    _, admin_token = add_person(db, "boss", "admin")
    pol = Policy(per_item=2)
    rounds.open_round(db, 0, folder, "auto", deadline_min=90)
    with _Server(create_app(db, pol, preload=1, max_body_bytes=16384)) as url:
        admin = _page(browser)
        admin.goto(f"{url}/admin#token={admin_token}")
        admin.wait_for_selector("#round:not([hidden])")
        assert admin.inner_text("#round-title") == "Online round 0"
        text = admin.inner_text("#round-text")
        assert "0 / 3 items have 2 label(s)" in text and "deadline" in text
        assert admin.is_disabled("#close-round")  # nothing to train on yet
        for who in ("alice", "bob"):
            for it in next_items(db, people[who], 2, pol):
                record_label(db, people[who], it["key"], "1", uuid.uuid4().hex, 900)
        done = rounds.progress(db, 0, 2)["complete"]
        assert done >= 1
        admin.reload()
        admin.wait_for_function(
            "n => document.getElementById('round-text').textContent.includes(`${n} / 3 items`)", arg=done
        )
        _shot(admin, tmp_path, "admin_round.png")
        assert admin.is_enabled("#close-round")
        admin.click("#close-round")
        admin.wait_for_function("() => document.getElementById('round-title').textContent.includes('closed')")
        assert "(admin boss)" in admin.inner_text("#round-text") and admin.is_hidden("#close-round")
        assert rounds.round_state(db)["closed_by"] == "admin boss"
