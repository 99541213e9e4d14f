"""The labelling server as a process under load and faults: kill -9 in the middle of a burst loses no
acknowledged label and stores none twice; several app processes on one PostgreSQL keep every rule;
the load benchmark's own checks."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tools import label_load, label_servers
from tools.label_load import LoadResult, check_stored, prepare, run_load


@pytest.mark.slow
def test_kill_9_in_a_burst_loses_no_acknowledged_label(tmp_path):
    db_url = str(tmp_path / "labels.db")
    src, tokens = prepare(tmp_path, items=400, annotators=20, db_url=db_url)
    overrides = [f"source={src}", f"db={db_url}", "assignment.per_item=3", "items.shuffle=false"]
    srv = label_servers.LabelServer(overrides, log=tmp_path / "server.log").start()
    res = LoadResult()
    burst = threading.Thread(
        target=run_load,
        args=(srv.url, tokens, 10**6),
        kwargs={"max_seconds": 600, "result": res, "images": False, "retry_share": 0.1},
    )
    burst.start()
    deadline = time.time() + 600
    while len(res.acked) < 150:
        assert time.time() < deadline and burst.is_alive(), (len(res.acked), res.refused)
        time.sleep(0.05)
    srv.kill()  # SIGKILL: no shutdown code runs
    burst.join(120)
    acked, unacked = dict(res.acked), dict(res.unacked)
    assert not res.refused and res.retries > 0 and res.retry_not_duplicate == 0

    srv = label_servers.LabelServer(
        overrides, log=tmp_path / "server.log"
    ).start()  # restart on the same file
    try:
        checks = check_stored(db_url, res)
        assert checks["lost"] == checks["wrong"] == checks["stored_twice"] == 0, checks
        assert checks["stored"] - len(acked) <= len(unacked)  # at most the unanswered ones got in
        # the clients resend what was never acknowledged, with the same submission ids: stored once
        for sid, (name, token, body) in unacked.items():
            r = httpx.post(
                srv.url + "/api/label", json=body, headers={"authorization": f"Bearer {token}"}, timeout=60
            )
            assert r.status_code == 200, r.text
            res.acked[sid] = (name, body["item"], body["choice"])
        # and labelling goes on
        run_load(srv.url, tokens, len(res.acked) + 100, max_seconds=300, images=False, result=res)
    finally:
        srv.stop()
    checks = check_stored(db_url, res)
    assert checks["lost"] == checks["wrong"] == checks["stored_twice"] == 0, checks
    assert checks["same_item_twice_for_one_annotator"] == 0
    assert checks["stored"] == len(res.acked) and checks["items_over_R"] == 0


@pytest.mark.slow
def test_several_app_processes_on_postgres_keep_every_rule(tmp_path):
    if label_servers.available():
        pytest.skip(label_servers.available())
    out = tmp_path / "load.json"
    rc = label_load.main(
        [
            "--out",
            str(out),
            "--annotators",
            "12",
            "--labels",
            "240",
            "--per-item",
            "3",
            "--db",
            "postgres",
            "--workers",
            "2",
            "--retry-share",
            "0.1",
            "--max-seconds",
            "400",
        ]
    )
    res = json.loads(out.read_text())
    assert rc == 0, res
    c = res["checks"]
    assert c["acknowledged"] == c["stored"] >= 240 and res["retries"] > 0
    assert c["lost"] == c["stored_twice"] == c["wrong"] == c["items_over_R"] == 0
    assert c["same_item_twice_for_one_annotator"] == 0 and res["retries_not_flagged_duplicate"] == 0
    assert res["latency"]["label"]["n"] >= 240 and res["labels_per_s"] > 0
