"""The labelling service without a browser: sources, assignment rules (on SQLite and on a real
PostgreSQL server), the HTTP API's refusals, the export against the labels given, the audit against
hand-computed figures, and the command line."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import pickapic
from pipeline.errors import UserError
from pipeline.label import assignment, audit
from pipeline.label.assignment import Policy, Refused, next_items, record_label
from pipeline.label.export import export
from pipeline.label.people import add_person, authenticate, revoke
from pipeline.label.sources import ImageReader, load_source
from pipeline.label.storage import Database, load_items
from tools import label_servers
from tools.toy.make_pickapic import make_rows, write_parquet


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """24 rows in 3 files: row 3 shows the same image twice, row 5 has no caption, row 7's caption is
    markup (it must show as text)."""
    out = tmp_path_factory.mktemp("toy")
    rows = make_rows(24, seed=3, tie_rate=0.2, unlabelled_rate=0.1, identical_rate=0)
    rows[3]["are_different"], rows[3]["jpg_1"] = False, rows[3]["jpg_0"]
    rows[5]["caption"] = None
    rows[7]["caption"] = "<script>window.__pwned = 1</script><b>bold?</b>"
    write_parquet(rows, out, rows_per_file=10)
    return out, rows


@pytest.fixture(scope="session")
def postgres():
    why = label_servers.available()
    if why:
        pytest.skip(why)
    pg = label_servers.TempPostgres(durable=False).start()  # the database server never crashes here
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])  # a server: slow tier
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "labels.db")
    return request.getfixturevalue("postgres").create_database("t" + uuid.uuid4().hex[:12])


def campaign(url, source, *names, checks=0, column="label_0", shuffle=False, max_items=0):
    db = Database(url)
    src = load_source(str(source), shuffle=shuffle, checks=checks, check_column=column, max_items=max_items)
    load_items(db, src.items, src.fingerprint, str(source))
    people = {n: add_person(db, n)[0].id for n in names}
    return db, src, people


def sid() -> str:
    return uuid.uuid4().hex


# -- sources ------------------------------------------------------------------------------------
def test_pickapic_source_keeps_judgeable_rows_and_reads_their_images(toy):
    path, rows = toy
    src = load_source(str(path), shuffle=False, checks=4, check_column="true_label_0")
    assert dict(src.skipped) == {"identical_images": 1, "null_caption": 1}
    kept = [r for i, r in enumerate(rows) if i not in (3, 5)]
    assert [it.images for it in src.items] == [[r["image_0_uid"], r["image_1_uid"]] for r in kept]
    assert [it.caption for it in src.items] == [r["caption"] for r in kept]
    reader = ImageReader(cache_bytes=1)  # a tiny cache: every read goes back to the file
    for it, r in zip(src.items, kept):
        assert reader.read(it.refs[0]) == r["jpg_0"] and reader.read(it.refs[1]) == r["jpg_1"]
        assert it.meta["true_label_0"] == r["true_label_0"] and it.meta["model_1"] == r["model_1"]
        assert it.meta["source_ranking_id"] == r["ranking_id"]
    checks = [(it, r) for it, r in zip(src.items, kept) if it.is_check]
    assert len(checks) == 4
    for it, r in checks:  # true_label_0 = 1: image 0 is better
        assert it.answer == (0 if r["true_label_0"] == 1.0 else 1)
    assert all(it.answer is None for it in src.items if not it.is_check)
    # the same rows give the same keys; a shuffle only reorders them
    again = load_source(str(path), shuffle=True, seed=5)
    assert sorted(it.key for it in again.items) == sorted(it.key for it in src.items)
    assert [it.key for it in again.items] != [it.key for it in src.items]


def _samples(folder: Path, prompts: int = 3, k: int = 3, lines: list | None = None) -> Path:
    (folder / "images").mkdir(parents=True)
    recs = []
    for p in range(prompts):
        for j in range(k):
            key = f"p{p}k{j}"
            Image.new("RGB", (32, 32), (40 * p, 80 * j, 10)).save(folder / "images" / f"{key}.jpg")
            recs.append(
                {
                    "image_key": key,
                    "prompt_key": f"prompt{p}",
                    "caption": f"caption {p}",
                    "k": j,
                    "file": f"images/{key}.jpg",
                }
            )
    Image.new("RGB", (32, 32)).save(folder / "images" / "lonely.jpg")
    recs.append(
        {"image_key": "lonely", "prompt_key": "alone", "caption": "x", "k": 0, "file": "images/lonely.jpg"}
    )
    text = "\n".join(json.dumps(r) for r in recs) + "\n" + "\n".join(lines or [])
    (folder / "images.jsonl").write_text(text)
    return folder


def test_sampling_folder_gives_best_of_k_items_or_every_pair(tmp_path):
    folder = _samples(tmp_path / "run")
    src = load_source(str(folder), shuffle=False)
    assert src.kind == "samples" and dict(src.skipped) == {"single_image_prompt": 1}
    assert [(it.kind, it.images) for it in src.items] == [
        ("best_of_k", [f"p{p}k0", f"p{p}k1", f"p{p}k2"]) for p in range(3)
    ]
    reader = ImageReader()
    assert reader.read(src.items[1].refs[2]) == (folder / "images" / "p1k2.jpg").read_bytes()
    pairs = load_source(str(folder), mode="pairs", shuffle=False)
    assert [it.images for it in pairs.items[:3]] == [["p0k0", "p0k1"], ["p0k0", "p0k2"], ["p0k1", "p0k2"]]
    assert len(pairs.items) == 9 and all(it.kind == "pair" for it in pairs.items)


@pytest.mark.parametrize(
    "line, message",
    [
        (
            '{"image_key": "e", "prompt_key": "q", "caption": "c", "k": 0, "file": "../../etc/passwd"}',
            "outside the sampling folder",
        ),
        (
            '{"image_key": "e", "prompt_key": "q", "caption": "c", "k": 0, "file": "/etc/passwd"}',
            "outside the sampling folder",
        ),
        (
            '{"image_key": "e", "prompt_key": "q", "caption": "c", "k": "0", "file": "images/p0k0.jpg"}',
            "field 'k' must be a int",
        ),
        (
            '{"image_key": "p0k1", "prompt_key": "q", "caption": "c", "k": 0, "file": "images/p0k0.jpg"}',
            "image_key 'p0k1' appears twice",
        ),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_sampling_index_line_is_named(tmp_path, line, message):
    folder = _samples(tmp_path / "run", lines=[line])
    with pytest.raises(UserError, match=rf"images.jsonl:11: .*{message}"):
        load_source(str(folder))


# -- assignment ---------------------------------------------------------------------------------
def test_each_item_goes_to_r_distinct_annotators_fewest_labels_first(toy, db_url):
    db, src, ids = campaign(db_url, toy[0], "a", "b", "c")
    keys = [it.key for it in src.items]
    pol = Policy(per_item=2, lease_s=600)
    # fewest labels first: a takes item 0, then b gets item 1 (0 labels) rather than item 0 (1 lease)
    assert [x["key"] for x in next_items(db, ids["a"], 1, pol)] == keys[:1]
    assert [x["key"] for x in next_items(db, ids["b"], 1, pol)] == keys[1:2]
    got_a = [x["key"] for x in next_items(db, ids["a"], 30, pol)]
    got_b = [x["key"] for x in next_items(db, ids["b"], 30, pol)]
    assert len(got_a) == len(got_b) == len(keys) == len(set(got_a)) == len(set(got_b))
    assert got_a[:1] == keys[:1]  # a's open item comes back first (a reload resumes where it was)
    assert next_items(db, ids["c"], 5, pol) == []  # every item has its R = 2 annotators
    for key in got_a:
        record_label(db, ids["a"], key, "0", sid(), 900)
    assert next_items(db, ids["a"], 5, pol) == []  # never the same item twice
    record_label(db, ids["b"], got_b[0], "skip", sid(), 900)  # a skip frees b's slot ...
    assert [x["key"] for x in next_items(db, ids["c"], 5, pol)] == [got_b[0]]  # ... for someone else
    with db.tx() as c:
        n_active, n_labels = c.execute(
            "SELECT n_active, n_labels FROM items WHERE key = ?", (got_b[0],)
        ).fetchone()
    assert (n_active, n_labels) == (2, 1)  # a's label + c's lease; b's skip is no label


def test_a_lapsed_lease_returns_the_item_and_a_late_answer_is_kept(toy, db_url, monkeypatch):
    db, src, ids = campaign(db_url, toy[0], "a", "b")
    pol = Policy(per_item=1, lease_s=60)
    t = [1000.0]
    monkeypatch.setattr(assignment, "now", lambda: t[0])
    first = next_items(db, ids["a"], 1, pol)[0]["key"]
    b_items = [x["key"] for x in next_items(db, ids["b"], 30, pol)]
    assert len(b_items) == len(src.items) - 1 and first not in b_items  # leased to a, R = 1
    t[0] += 61
    assert [x["key"] for x in next_items(db, ids["b"], 30, pol)] == [first]  # a's lease ran out
    record_label(db, ids["a"], first, "1", sid(), 70_000)  # a answers late: accepted
    assert next_items(db, ids["a"], 1, pol)[0]["key"] != first  # and a never gets it again


def test_retries_are_stored_once_and_wrong_labels_refused(toy, db_url):
    db, src, ids = campaign(db_url, toy[0], "a", "b")
    pol = Policy(per_item=2)
    key = next_items(db, ids["a"], 1, pol)[0]["key"]
    s = sid()
    first = record_label(db, ids["a"], key, "1", s, 1500)
    assert record_label(db, ids["a"], key, "1", s, 1500) == (first[0], True)  # a retried request
    with pytest.raises(Refused, match="used for another label"):
        record_label(db, ids["a"], key, "0", s, 1500)
    with pytest.raises(Refused, match="labelled this item already"):
        record_label(db, ids["a"], key, "0", sid(), 1500)
    other = src.items[5].key
    with pytest.raises(Refused, match="not given to you") as e:
        record_label(db, ids["b"], key, "0", sid(), 10)  # b was never given it
    assert e.value.status == 403
    next_items(db, ids["b"], 30, pol)
    for bad, status in (("2", 422), ("left", 422), ("-1", 422)):
        with pytest.raises(Refused) as e:
            record_label(db, ids["b"], other, bad, sid(), 10)
        assert e.value.status == status
    with pytest.raises(Refused) as e:
        record_label(db, ids["b"], "nosuchitem", "0", sid(), 10)
    assert e.value.status == 404
    with db.tx() as c:
        assert c.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 1


def test_check_items_come_every_n_to_everyone(toy, db_url):
    db, src, ids = campaign(db_url, toy[0], "a", "b", checks=2, column="true_label_0")
    checks = {it.key for it in src.items if it.is_check}
    pol = Policy(per_item=1, check_every=5)
    for who in ("a", "b"):
        got = [x["key"] for x in next_items(db, ids[who], 12, pol)]
        assert [i for i, k in enumerate(got) if k in checks] == [4, 9], who  # the 5th and the 10th
    # with R = 1, a and b shared the normal items, but both saw both checks


# -- HTTP ---------------------------------------------------------------------------------------
@pytest.fixture
def client(toy, tmp_path):
    from fastapi.testclient import TestClient

    from pipeline.label.app import create_app

    db, src, _ = campaign(str(tmp_path / "labels.db"), toy[0], shuffle=False)
    tokens = {n: add_person(db, n)[1] for n in ("alice", "bob")}
    tokens["boss"] = add_person(db, "boss", "admin")[1]
    c = TestClient(create_app(db, Policy(per_item=2), max_body_bytes=4096))
    c.tokens, c.src, c.db = tokens, src, db
    return c


def H(token):
    return {"authorization": f"Bearer {token}"}


def test_the_api_refuses_what_it_must(client):
    c, t = client, client.tokens
    item = c.post("/api/next", json={"n": 1}, headers=H(t["alice"])).json()["items"][0]
    lab = {"item": item["key"], "choice": "0", "submission_id": sid(), "duration_ms": 800}
    cases = [
        (c.post("/api/label", json=lab), 401, "sign in"),  # no token
        (c.post("/api/label", json=lab, headers=H("x" * 43)), 401, "sign in"),  # unknown token
        (c.post("/api/label", json=lab, headers=H(t["bob"])), 403, "not given to you"),  # alice's item
        (
            c.post("/api/label", json={**lab, "annotator": "bob"}, headers=H(t["alice"])),
            422,
            "annotator: Extra",
        ),
        (c.post("/api/label", json={**lab, "user_id": 2}, headers=H(t["alice"])), 422, "user_id: Extra"),
        (c.post("/api/label", json=lab, headers=H(t["boss"])), 403, "admin token"),
        (c.get("/api/admin/summary", headers=H(t["alice"])), 403, "admin token"),
        (c.get("/api/admin/summary"), 401, "sign in"),
        (
            c.post(
                "/api/label",
                content=b'{"item": "' + b"a" * 5000 + b'"}',
                headers={**H(t["alice"]), "content-type": "application/json"},
            ),
            413,
            "over 4096 bytes",
        ),
        (
            c.post(
                "/api/label",
                content=b"{not json",
                headers={**H(t["alice"]), "content-type": "application/json"},
            ),
            422,
            "not valid JSON",
        ),
        (c.post("/api/label", json=[1, 2], headers=H(t["alice"])), 422, ""),
        (
            c.post("/api/label", json={**lab, "duration_ms": "soon"}, headers=H(t["alice"])),
            422,
            "duration_ms",
        ),
        (c.post("/api/label", json={**lab, "duration_ms": -5}, headers=H(t["alice"])), 422, "duration_ms"),
        (c.post("/api/label", json={**lab, "item": "../../etc"}, headers=H(t["alice"])), 422, "item"),
        (
            c.post("/api/label", json={**lab, "submission_id": "x"}, headers=H(t["alice"])),
            422,
            "submission_id",
        ),
        (c.post("/api/label", json={**lab, "choice": "7"}, headers=H(t["alice"])), 422, "choice"),
        (
            c.post("/api/next", json={"n": 1000}, headers=H(t["alice"])),
            422,
            "n: Input should be less than or equal to 16",
        ),
        (c.post("/api/signin", json={"token": "nope"}), 401, "unknown or revoked"),
        (c.get("/static/..%2Fapp.py"), 404, ""),
        (c.get("/static/app.py"), 404, "no such file"),
        (c.get("/api/image/..%2F..%2Fetc%2Fpasswd/0", headers=H(t["alice"])), 404, ""),
        (c.get("/api/image/abc/..%2F..%2Fetc%2Fpasswd", headers=H(t["alice"])), 404, ""),
        (c.get("/api/image/abc/x", headers=H(t["alice"])), 422, "index"),
        (c.get(f"/api/image/{item['key']}/7", headers=H(t["alice"])), 404, "no such image"),
        (c.get(f"/api/image/{item['key']}/0", headers=H(t["bob"])), 404, "no such image"),  # not bob's item
        (c.get(f"/api/image/{item['key']}/0"), 401, "sign in"),
    ]
    for i, (r, status, text) in enumerate(cases):
        assert r.status_code == status, (i, r.status_code, r.text)
        assert text in r.json()["detail"], (i, r.text)
    # streamed without a Content-Length: cut off as it exceeds the limit
    chunks = (b"x" * 1024 for _ in range(8))
    r = c.post("/api/label", content=chunks, headers={**H(t["alice"]), "content-type": "application/json"})
    assert r.status_code == 413
    with c.db.tx() as cur:
        assert cur.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 0  # nothing got through


def test_the_api_labels_and_serves_images_by_key(client, toy):
    c, t = client, client.tokens
    rows = {r["image_0_uid"]: r for r in toy[1]}
    r = c.post("/api/next", json={"n": 2}, headers=H(t["alice"]))
    assert r.status_code == 200 and len(r.json()["items"]) == 2
    item = r.json()["items"][0]
    assert sorted(im["index"] for im in item["images"]) == [0, 1]
    src = next(it for it in c.src.items if it.key == item["key"])
    img = c.get("/" + item["images"][0]["url"], headers=H(t["alice"]))
    index = item["images"][0]["index"]
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert img.content == rows[src.images[0]][f"jpg_{index}"]
    ok = c.post(
        "/api/label",
        json={"item": item["key"], "choice": str(index), "submission_id": "retry-me-1", "duration_ms": 1234},
        headers=H(t["alice"]),
    )
    again = c.post(
        "/api/label",
        json={"item": item["key"], "choice": str(index), "submission_id": "retry-me-1", "duration_ms": 1234},
        headers=H(t["alice"]),
    )
    assert ok.json() == {"ok": True, "label_id": 1, "duplicate": False}
    assert again.json() == {"ok": True, "label_id": 1, "duplicate": True}
    me = c.get("/api/me", headers=H(t["alice"])).json()
    assert me["name"] == "alice" and me["progress"]["labelled_by_you"] == 1
    page = c.get("/")
    assert "script-src 'self'" in page.headers[
        "content-security-policy"
    ] and "<script>" not in page.text.lower().replace('<script src="static/app.js" defer></script>', "")
    # the cookie set at sign-in authenticates like the header
    assert c.post("/api/signin", json={"token": t["bob"]}).status_code == 200
    assert c.get("/api/me").json()["name"] == "bob"


# -- export -------------------------------------------------------------------------------------
def test_export_rows_equal_the_labels_and_encode_reads_them(toy, tmp_path):
    path, rows = toy
    db, src, ids = campaign(str(tmp_path / "l.db"), path, "ann", "bea")
    pol = Policy(per_item=2)
    by_uid = {r["image_0_uid"]: r for r in rows}
    given = []  # (annotator, item key, choice)
    plan = {"ann": ["0", "1", "tie", "skip", "0", "1"], "bea": ["1", "1", "0", "tie", "skip", "0"]}
    for who, choices in plan.items():
        items = next_items(db, ids[who], len(choices), pol)
        for it, ch in zip(items, choices):
            record_label(db, ids[who], it["key"], ch, sid(), 2000)
            given.append((who, it["key"], ch))
    out = tmp_path / "export"
    s = export(db, out)
    assert s["labels"] == s["rows"] == 12 and s["choices"] == {"image": 8, "tie": 2, "skip": 2}
    table = pq.read_table(out / s["files"][0]).to_pylist()
    items = {it.key: it for it in src.items}
    user = {"ann": 1, "bea": 2}
    for row, (who, key, ch) in zip(table, given):
        it = items[key]
        expect = {
            "0": (1.0, 0.0, True),
            "1": (0.0, 1.0, True),
            "tie": (0.5, 0.5, True),
            "skip": (0.0, 0.0, False),
        }
        assert (row["label_0"], row["label_1"], row["has_label"]) == expect[ch]
        assert (row["annotator"], row["user_id"], row["item_key"], row["choice"]) == (who, user[who], key, ch)
        assert (row["image_0_uid"], row["image_1_uid"]) == tuple(it.images)
        src_row = by_uid[it.images[0]]
        assert row["jpg_0"] == src_row["jpg_0"] and row["jpg_1"] == src_row["jpg_1"]
        assert row["caption"] == src_row["caption"] and row["true_label_0"] == src_row["true_label_0"]
        assert row["model_0"] == src_row["model_0"] and row["source_ranking_id"] == src_row["ranking_id"]
        assert row["best_image_uid"] == {"0": it.images[0], "1": it.images[1]}.get(ch, "")
        assert row["duration_ms"] == 2000 and row["created_at"] >= row["shown_at"]
    assert len({r["ranking_id"] for r in table}) == 12
    # the encode stage's reader takes it as Pick-a-Pic: decisive labels kept, ties and skips dropped
    files = pickapic.list_sources(str(out))
    pickapic.check_columns(files, ["true_label_0"])
    scan = pickapic.scan(files)
    assert len(scan.kept) == 8 and dict(scan.skipped) == {"tie": 2, "unlabelled": 2}
    prefs = [json.loads(line) for line in (out / "image_preferences.jsonl").read_text().splitlines()]
    expect = []
    for who, key, ch in given:
        if ch == "skip":
            continue
        for j, img in enumerate(items[key].images):
            score = 0.5 if ch == "tie" else float(int(ch) == j)
            expect.append((items[key].prompt_key, img, user[who], who, score))
    assert [
        (p["prompt_key"], p["image_key"], p["user_id"], p["annotator"], p["score"]) for p in prefs
    ] == expect
    # an export replaces an earlier one; a folder that is not one is refused
    assert export(db, out)["rows"] == 12 and not (tmp_path / "export.tmp-export").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not an earlier export"):
        export(db, tmp_path / "mine")


def test_best_of_k_export_rows_and_image_preferences(tmp_path):
    folder = _samples(tmp_path / "run", prompts=2, k=3)
    db, src, ids = campaign(str(tmp_path / "l.db"), folder, "ann")
    items = next_items(db, ids["ann"], 2, Policy())
    record_label(db, ids["ann"], items[0]["key"], "2", sid(), 10)
    record_label(db, ids["ann"], items[1]["key"], "tie", sid(), 10)
    s = export(db, tmp_path / "out")
    rows = pq.read_table(tmp_path / "out" / s["files"][0]).to_pylist()
    p0, p1 = (next(it for it in src.items if it.key == x["key"]) for x in items)
    assert [(r["image_0_uid"], r["image_1_uid"], r["label_0"], r["label_1"]) for r in rows] == [
        (p0.images[2], p0.images[0], 1.0, 0.0),
        (p0.images[2], p0.images[1], 1.0, 0.0),
        (p1.images[0], p1.images[1], 0.5, 0.5),
        (p1.images[0], p1.images[2], 0.5, 0.5),
    ]
    assert len({r["ranking_id"] for r in rows}) == 2  # one ranking per label
    prefs = [json.loads(x) for x in (tmp_path / "out" / "image_preferences.jsonl").read_text().splitlines()]
    assert [(p["image_key"], p["score"]) for p in prefs] == [
        *zip(p0.images, [0.0, 0.0, 1.0]),
        *zip(p1.images, [0.5, 0.5, 0.5]),
    ]
    assert {p["prompt_key"] for p in prefs} == {p0.prompt_key, p1.prompt_key}


# -- audit --------------------------------------------------------------------------------------
def test_disagreement_and_alpha_against_hand_computed_values():
    """Three annotators, three pair items:
    item 1: a=0 b=0 c=1; item 2: a=1 b=1 c=0; item 3: a=0 b=tie c=skip.
    Leave-one-out majority: item 1: a's others {0, 1} split -> a in the top pair: 1 - 1/2 = 0.5;
    b likewise 0.5; c's others {0, 0} -> c disagrees: 1. Item 2 the same. Item 3: a's others {tie}
    -> 1; b's others {0} -> 1; c skipped -> none. So a: (0.5 + 0.5 + 1) / 3, c: 1.

    Krippendorff's alpha (nominal), units with >= 2 judgements: item 1 {0, 0, 1}, item 2 {1, 1, 0},
    item 3 {0, tie}. Coincidences o_ck = sum_u (pairs (c, k) within u) / (m_u - 1):
    item 1: o00 += 2/2, o01 += 2/2, o10 += 2/2; item 2: o11 += 1, o10 += 1, o01 += 1; item 3:
    o0t += 1, ot0 += 1. So o00 = 1, o11 = 1, o01 = o10 = 2, o0t = ot0 = 1; n_0 = 4, n_1 = 3,
    n_t = 1, n = 8. alpha = 1 - (n - 1) * (sum_{c != k} o_ck) / (sum_{c != k} n_c n_k)
    = 1 - 7 * 6 / (2 * (4*3 + 4*1 + 3*1)) = 1 - 42 / 38 = -2/19."""
    labels = [
        {"item_id": 1, "choice": "0"},
        {"item_id": 1, "choice": "0"},
        {"item_id": 1, "choice": "1"},
        {"item_id": 2, "choice": "1"},
        {"item_id": 2, "choice": "1"},
        {"item_id": 2, "choice": "0"},
        {"item_id": 3, "choice": "0"},
        {"item_id": 3, "choice": "tie"},
        {"item_id": 3, "choice": "skip"},
    ]
    assert audit.disagreement(labels) == [0.5, 0.5, 1.0, 0.5, 0.5, 1.0, 1.0, 1.0, None]
    assert audit.alpha(labels) == pytest.approx(-2 / 19)
    assert audit.alpha(labels[:2]) is None  # one category: undefined


def test_the_admin_summary_ranks_the_contrarian_first(toy, tmp_path):
    path, rows = toy
    db, src, ids = campaign(
        str(tmp_path / "l.db"), path, "ann", "bea", "cid", checks=2, column="true_label_0", max_items=8
    )
    pol = Policy(per_item=3, check_every=4)
    truth = {it.key: 0 if it.meta["true_label_0"] == 1.0 else 1 for it in src.items}
    for who in ("ann", "bea", "cid"):
        for it in next_items(db, ids[who], 8, pol):
            good = truth[it["key"]]
            record_label(db, ids[who], it["key"], str(1 - good if who == "cid" else good), sid(), 1000)
    s = audit.summary(db, per_item=3, min_labels=1)
    first, *rest = s["annotators"]
    assert first["annotator"] == "cid" and first["agreement"] == 0.0 and first["check_accuracy"] == 0.0
    assert {a["annotator"] for a in rest} == {"ann", "bea"}
    for a in rest:  # against the two others: one agrees, one does not -> a split majority, 0.5 off
        assert a["agreement"] == 0.5 and a["check_accuracy"] == 1.0 and a["checks"] == 2
    assert s["labels"] == 24 and s["complete"] == 6 and s["check_items"] == 2
    assert s["alpha"] < 0


# -- command line -------------------------------------------------------------------------------
def test_cli_tokens_are_stored_hashed_and_revocable(tmp_path, capsys):
    from stages.label import cli_main

    db_path = tmp_path / "l.db"
    assert (
        cli_main(["add-annotator", "--db", str(db_path), "alice", "--url", "https://label.example.org/"]) == 0
    )
    out = capsys.readouterr().out
    token = out.split("#token=")[1].split()[0]
    assert out.startswith("annotator alice (user_id 1)") and "https://label.example.org/#token=" in out
    assert cli_main(["add-admin", "--db", str(db_path), "ana", "--user-id", "77"]) == 0
    assert "/admin#token=" in capsys.readouterr().out
    db = Database(str(db_path))
    assert authenticate(db, token).name == "alice"
    db.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("l.db*"))
    assert token.encode() not in raw  # only its hash is stored
    assert cli_main(["add-annotator", "--db", str(db_path), "alice"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert cli_main(["add-annotator", "--db", str(db_path), "bad name!"]) == 2
    db = Database(str(db_path))
    revoke(db, "alice")
    assert authenticate(db, token) is None
    assert cli_main(["annotators", "--db", str(db_path)]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "False" in listing and "77" in listing


def test_cli_refuses_bad_configs_and_sources_before_serving(tmp_path, capsys):
    from stages.label import cli_main

    db = f"db={tmp_path / 'l.db'}"
    cfg = ["--config", "configs/label/default.yaml"]
    assert cli_main(["serve", *cfg, "source=/nonexistent/x", db, "assignment.per_itme=2"]) == 2
    assert "assignment.per_itme: unknown key (did you mean 'per_item'?)" in capsys.readouterr().err
    assert cli_main(["serve", *cfg, "source=/nonexistent/x", db, "server.port=70000"]) == 2
    assert "server.port: must be in [0, 65535]" in capsys.readouterr().err
    assert cli_main(["serve", *cfg, "source=/nonexistent/x", db]) == 2
    assert "no parquet files found" in capsys.readouterr().err
    assert cli_main(["export", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "o")]) == 2
    assert "no such database file" in capsys.readouterr().err


def test_the_image_reader_cache_stays_within_its_budget(toy):
    path, rows = toy
    src = load_source(str(path), shuffle=False)
    reader = ImageReader(cache_bytes=30_000)
    for it in src.items:
        reader.read(it.refs[0])
        assert sum(reader._sizes.values()) <= 30_000 or len(reader._cache) == 1


def test_export_measures_each_annotators_flip_rate_for_training(tmp_path):
    """Three annotators label every pair (per_item 3): two follow the toy world's truth, carl labels
    against it. The export's flip_rates.json (Dawid-Skene over the redundant labels) puts carl first with
    a rate near 1 and the others near 0; Robust-DPO's flip-rate table reads it by user_id."""
    import torch

    from pipeline.losses.flip_rates import FlipRateTable

    out = tmp_path / "toy"
    write_parquet(
        make_rows(30, seed=5, tie_rate=0, unlabelled_rate=0, identical_rate=0), out, rows_per_file=30
    )
    db, src, ids = campaign(str(tmp_path / "l.db"), out, "ann", "bea", "carl")
    truth = {it.key: 0 if it.meta["true_label_0"] == 1.0 else 1 for it in src.items}
    pol = Policy(per_item=3)
    for who in ("ann", "bea", "carl"):
        for it in next_items(db, ids[who], 30, pol):
            better = truth[it["key"]]
            record_label(db, ids[who], it["key"], str(better if who != "carl" else 1 - better), sid(), 900)
    s = export(db, tmp_path / "export")
    assert s["flip_rates_file"] == "flip_rates.json" and 0.2 < s["global_flip_rate"] < 0.45
    ann = json.loads((tmp_path / "export" / "flip_rates.json").read_text())
    rates = {a["name"]: a["flip_rate"] for a in ann["annotators"]}
    assert ann["annotators"][0]["name"] == "carl" and rates["carl"] > 0.9
    assert rates["ann"] < 0.1 and rates["bea"] < 0.1
    assert all(a["labels"] == a["informative"] == 30 for a in ann["annotators"])
    table = FlipRateTable.from_file(tmp_path / "export" / "flip_rates.json")
    got = table.lookup(torch.tensor([ids["carl"], ids["ann"], 12345]))
    assert got[0] > 0.9 and got[1] < 0.1 and got[2].item() == pytest.approx(ann["global_flip_rate"])


def test_online_rounds_open_close_and_export_their_own_labels(tmp_path):
    """pipeline.label.rounds through the app: two rounds of the same prompt groups (the same sample
    keys) are separate items; round 0 closes by its deadline once it has a label (not before), its
    items are no longer handed out and a late label is refused; round 1 closes when an admin says so
    (not without a decisive label), or when complete; each round's export holds its own labels; a v1
    database is migrated."""
    from fastapi.testclient import TestClient

    from pipeline.label import rounds
    from pipeline.label.app import create_app

    folder = _samples(tmp_path / "r0", prompts=2, k=2)
    db = Database(str(tmp_path / "labels.db"))
    tokens = {n: add_person(db, n)[1] for n in ("alice", "bob")}
    tokens["boss"] = add_person(db, "boss", "admin")[1]
    c = TestClient(create_app(db, Policy(per_item=2), max_body_bytes=4096))

    s0 = rounds.open_round(db, 0, folder, "auto", deadline_min=0.5)
    assert s0["items"] == 2 and s0["deadline"] == pytest.approx(s0["opened_at"] + 30)
    assert rounds.open_round(db, 0, folder, "auto", 0.5) == s0  # a restarted loop: the same round
    t_after = s0["deadline"] + 1
    assert rounds.should_close(db, 0, 2, t_after) is None  # past the deadline, but no label yet

    def label(who: str, choice: str = "0") -> tuple[str, int]:
        items = c.post("/api/next", json={"n": 1}, headers=H(tokens[who])).json()["items"]
        if not items:
            return "", 0
        lab = {"item": items[0]["key"], "choice": choice, "submission_id": sid(), "duration_ms": 500}
        return items[0]["key"], c.post("/api/label", json=lab, headers=H(tokens[who])).status_code

    key, code = label("alice")
    assert code == 200 and key.startswith("r000o")
    assert rounds.should_close(db, 0, 2, s0["opened_at"] + 1) is None  # before the deadline
    assert rounds.should_close(db, 0, 2, t_after) == "deadline"
    # bob holds round 0's other item when the round closes: his label is refused, nothing more is given
    held = c.post("/api/next", json={"n": 1}, headers=H(tokens["bob"])).json()["items"][0]["key"]
    rounds.close_round(db, 0, "deadline")
    late = {"item": held, "choice": "1", "submission_id": sid(), "duration_ms": 500}
    r = c.post("/api/label", json=late, headers=H(tokens["bob"]))
    assert r.status_code == 409 and "round has closed" in r.json()["detail"]
    assert label("bob") == ("", 0)

    # round 1: the same sample keys, new items; the admin page shows it
    s1 = rounds.open_round(db, 1, folder, "auto", deadline_min=0)
    assert s1["round"] == 1 and s1["deadline"] is None
    summary = c.get("/api/admin/summary", headers=H(tokens["boss"])).json()["round"]
    assert (summary["round"], summary["items"], summary["complete"], summary["closed"]) == (1, 2, 0, False)
    r = c.post("/api/admin/close-round", json={"round": 1}, headers=H(tokens["boss"]))
    assert r.status_code == 409 and "no label yet" in r.json()["detail"]
    assert c.post("/api/admin/close-round", json={"round": 1}, headers=H(tokens["alice"])).status_code == 403
    for who in ("alice", "bob", "alice", "bob"):
        assert label(who, "1")[1] == 200
    assert rounds.should_close(db, 1, 2) == "complete"
    r = c.post("/api/admin/close-round", json={"round": 1}, headers=H(tokens["boss"]))
    assert r.status_code == 200 and r.json()["closed_by"] == "admin boss"
    assert c.post("/api/admin/close-round", json={"round": 0}, headers=H(tokens["boss"])).status_code == 409

    e0, e1 = export(db, tmp_path / "e0", online_round=0), export(db, tmp_path / "e1", online_round=1)
    assert (e0["labels"], e1["labels"]) == (1, 4) and e1["online_round"] == 1
    prefs = [json.loads(x) for x in (tmp_path / "e1" / "image_preferences.jsonl").read_text().splitlines()]
    assert {p["image_key"] for p in prefs} <= {"p0k0", "p0k1", "p1k0", "p1k1"}  # the sample's own keys
    keys = set(pq.read_table(tmp_path / "e1" / "labels-00000.parquet")["item_key"].to_pylist())
    assert all(k.startswith("r001o") for k in keys) and len(keys) == 2

    # a database of schema 1 gains the column, its items open
    old = tmp_path / "v1.db"
    import sqlite3

    Database(str(old)).close()
    con = sqlite3.connect(old)
    con.execute("ALTER TABLE items DROP COLUMN closed")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    again = Database(str(old))
    assert again.get_meta("schema_version") == 2
    with again.tx() as cur:
        assert "closed" in [r[1] for r in cur.execute("PRAGMA table_info(items)").fetchall()]
