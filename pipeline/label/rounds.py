"""Online rounds in the labelling service: D3PO's loop with people (``stages.online`` with
``feedback.source=human``).

Every round the loop adds the round's sampled images to the one campaign database as items whose keys
carry the round (``r003o<key>``: the same prompt group gives the same sample key in every round), and
opens the round: the service's meta row ``online_round`` holds its number, its items, when it opened,
its deadline and whether it is closed. Annotators get the open round's items like any other. The round
closes when every item has R labels (``assignment.per_item``), at its deadline, or when an admin closes
it (the admin page's button, ``POST /api/admin/close-round``); its items are then closed too (no longer
handed out; a label arriving for one is refused with a message). The loop exports that round's labels
alone (``pipeline.label.export``, ``online_round``) and feeds them to the feedback stage. A deadline or
an admin can close a round only once it holds a decisive label (there is nothing to train on before).

Everything lives in the database, so a loop killed while it waits reopens the same round with the same
deadline and every label acknowledged before the kill, which its export uses once (round r's export
reads round r's items only).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pipeline.label.sources import load_source
from pipeline.label.storage import Database, load_items, now

ROUND_META = "online_round"


def round_prefix(r: int) -> str:
    """Item keys are alphanumeric; the letter after the number keeps round 1's prefix from matching
    round 10's keys."""
    return f"r{r:03d}o"


def _state(db: Database) -> dict | None:
    return db.get_meta(ROUND_META)


def round_state(db: Database) -> dict | None:
    """The current round's state, or None outside an online loop."""
    return _state(db)


def open_round(db: Database, r: int, folder: Path, mode: str, deadline_min: float) -> dict:
    """Add round r's images (a sampling folder with ``images.jsonl``) and open it; a reopened round (a
    restarted loop) keeps its items, labels, opening time and deadline. Returns its state."""
    src = load_source(str(folder), mode=mode, shuffle=True, seed=r)
    items = [
        replace(it, key=round_prefix(r) + it.key, meta={**it.meta, "online_round": r}) for it in src.items
    ]
    load_items(db, items, f"online-round-{r}:{src.fingerprint}", str(folder))
    state = _state(db)
    if state is None or state["round"] != r:
        t = now()
        state = {
            "round": r,
            "folder": str(folder),
            "items": len(items),
            "opened_at": t,
            "deadline": t + 60.0 * deadline_min if deadline_min > 0 else None,
            "closed": False,
            "closed_by": None,
            "closed_at": None,
        }
        db.set_meta(ROUND_META, state)
    return state


def progress(db: Database, r: int, per_item: int) -> dict:
    """Round r's items: how many, how many have R labels, how many have any; its decisive labels."""
    like = round_prefix(r) + "%"
    with db.tx() as c:
        items, complete, started = c.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN n_labels >= ? THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(CASE WHEN n_labels > 0 THEN 1 ELSE 0 END), 0) FROM items WHERE key LIKE ?",
            (per_item, like),
        ).fetchone()
        decisive = c.execute(
            "SELECT COUNT(*) FROM labels l JOIN items i ON i.id = l.item_id "
            "WHERE i.key LIKE ? AND l.choice NOT IN ('tie', 'skip')",
            (like,),
        ).fetchone()[0]
    return {
        "items": int(items),
        "complete": int(complete),
        "started": int(started),
        "decisive_labels": int(decisive),
        "per_item": per_item,
    }


def close_round(db: Database, r: int, by: str) -> dict:
    """Close round r (``by``: "complete", "deadline" or "admin NAME") and its items. Idempotent: a
    closed round keeps who closed it first. Returns the state."""
    state = _state(db)
    if state is None or state["round"] != r:
        raise ValueError(f"round {r} is not the open round ({None if state is None else state['round']})")
    if not state["closed"]:
        state.update(closed=True, closed_by=by, closed_at=now())
        with db.tx(write=True) as c:
            c.execute("UPDATE items SET closed = 1 WHERE key LIKE ?", (round_prefix(r) + "%",))
        db.set_meta(ROUND_META, state)
    return state


def should_close(db: Database, r: int, per_item: int, t: float | None = None) -> str | None:
    """Why round r should close now ("complete", "deadline", or the admin's close already recorded), or
    None to keep waiting. A deadline closes only a round with a decisive label."""
    state = _state(db)
    if state is None or state["round"] != r:
        return None
    if state["closed"]:
        return state["closed_by"]
    p = progress(db, r, per_item)
    if p["items"] and p["complete"] == p["items"]:
        return "complete"
    t = now() if t is None else t
    if state["deadline"] is not None and t >= state["deadline"] and p["decisive_labels"] > 0:
        return "deadline"
    return None
