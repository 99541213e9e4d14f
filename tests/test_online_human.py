"""D3PO's online loop with people: ``stages.online`` with ``feedback_overrides=[source=human]`` serves
each round's samples in the labelling service and waits for them. Two simulated annotators label
through the service's HTTP API (as tools.label_load does), both preferring the brighter image; the loop
is killed (SIGKILL) in the middle of round 0's labelling and rerun: the labels acknowledged before the
kill are kept and used once, and the loop goes on to train both rounds."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
import uuid

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.label.people import add_person
from pipeline.label.storage import Database
from tests.helpers.run import ROOT, env
from tests.test_online import args
from tools.label_servers import free_port

pytestmark = pytest.mark.slow  # a loop, a labelling server and trainers in subprocesses


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("human_prompts")
    (d / "train.txt").write_text("a red cat, photo\na blue ship, sketch\na green house, watercolor\n")
    (d / "eval.txt").write_text("a black dog, oil\n")
    return d


class Annotator:
    """Labels through the HTTP API: the brighter of an item's images (mean pixel value)."""

    def __init__(self, url: str, token: str):
        self.c = httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=30)
        self.given: list[tuple[str, str]] = []  # (item key, choice) acknowledged

    def label_one(self) -> bool:
        try:
            r = self.c.post("/api/next", json={"n": 1})
        except httpx.TransportError:
            return False  # the service is not up (yet, or again)
        items = r.json()["items"] if r.status_code == 200 else []
        if not items:
            return False
        it = items[0]
        bright = {
            im["index"]: float(np.asarray(Image.open(io.BytesIO(self.c.get("/" + im["url"]).content))).mean())
            for im in it["images"]
        }
        choice = str(max(bright, key=bright.get))
        body = {"item": it["key"], "choice": choice, "submission_id": uuid.uuid4().hex, "duration_ms": 700}
        r = self.c.post("/api/label", json=body)
        if r.status_code == 200:
            self.given.append((it["key"], choice))
            return True
        return False


def start(tiny_sd15, files, out, port: int) -> subprocess.Popen:
    extra = [
        "rounds=2",
        "feedback_overrides=[source=human]",
        "eval.rewards=[brightness]",
        f"label.overrides=[assignment.per_item=2,server.port={port}]",
        "label.poll_s=0.2",
        "sample_overrides=[prompts.max=3]",
    ]
    cmd = [sys.executable, "-m", "stages.online", *args(tiny_sd15, files, out, *extra)]
    log = open(out.parent / "loop.log", "a")  # noqa: SIM115 - closed with the test's tmp folder
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, text=True)


def test_rounds_labelled_by_people_survive_a_kill(tiny_sd15, files, tmp_path):
    out = tmp_path / "loop"
    out.mkdir()
    db = Database(str(out / "labels.db"))  # the loop's default campaign: people are added beforehand
    tokens = {n: add_person(db, n)[1] for n in ("ann", "bea")}
    db.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ann, bea = Annotator(url, tokens["ann"]), Annotator(url, tokens["bea"])

    loop = start(tiny_sd15, files, out, port)
    deadline = time.time() + 600
    while not ann.label_one():  # round 0's 3 items appear once sampled and served
        assert loop.poll() is None, (out.parent / "loop.log").read_text()[-3000:]
        assert time.time() < deadline, "no item to label"
        time.sleep(0.3)
    ann.label_one()
    before_kill = list(ann.given)
    assert len(before_kill) == 2 and all(k.startswith("r000o") for k, _ in before_kill)
    loop.send_signal(signal.SIGKILL)  # the service (its child) dies with it
    loop.wait()
    assert not (out / "round_000" / "label.done").exists()

    loop = start(tiny_sd15, files, out, port)
    while loop.poll() is None and time.time() < deadline:
        if not (ann.label_one() | bea.label_one()):
            time.sleep(0.3)
    assert loop.returncode == 0, (out.parent / "loop.log").read_text()[-4000:]

    for r in (0, 1):
        rd = out / f"round_{r:03d}"
        labels = pq.read_table(rd / "labels" / "labels-00000.parquet").to_pydict()
        keys = labels["item_key"]
        assert all(k.startswith(f"r{r:03d}o") for k in keys) and len(keys) == 3 * 2  # 3 items x R = 2
        stored = sorted(zip(keys, labels["choice"]))
        given = sorted((k, c) for a in (ann, bea) for k, c in a.given if k.startswith(f"r{r:03d}o"))
        assert stored == given  # every acknowledged label of the round, once; none of another round
        done = json.loads((rd / "label.done").read_text())
        assert done["closed_by"] == "complete" and done["labels"] == 6
        fb = json.loads((rd / "feedback" / "summary.json").read_text())
        assert fb["source"] == "human" and fb["human"] is not None
    # the labels acknowledged before the kill: in round 0's export, each exactly once, as ann gave them
    r0 = pq.read_table(out / "round_000" / "labels" / "labels-00000.parquet").to_pydict()
    ann_rows = [(k, c) for k, c, a in zip(r0["item_key"], r0["choice"], r0["annotator"]) if a == "ann"]
    assert all(ann_rows.count(x) == 1 for x in before_kill)
    report = json.loads((out / "report.json").read_text())
    assert [row["round"] for row in report["rounds"]] == [-1, 0, 1]
    assert report["rounds"][1]["labels"]["closed_by"] == "complete"
    assert "label" in report["rounds"][2]["seconds"]


def test_people_in_the_loop_need_an_eval_reward_and_no_label_source(tiny_sd15, files, tmp_path, capsys):
    from stages.online import cli_main

    out = tmp_path / "loop"
    human = "feedback_overrides=[source=human]"
    assert cli_main(args(tiny_sd15, files, out, human)) == 2
    assert "eval.rewards: required with feedback from people" in capsys.readouterr().err
    bad = "label.overrides=[source=/data/x]"
    assert cli_main(args(tiny_sd15, files, out, human, "eval.rewards=[brightness]", bad)) == 2
    assert "the loop adds each round's samples itself" in capsys.readouterr().err
    assert cli_main(args(tiny_sd15, files, out, human, "eval.rewards=[brightness]", "label.poll_s=0")) == 2
    assert "label.poll_s" in capsys.readouterr().err
    assert not out.exists()
