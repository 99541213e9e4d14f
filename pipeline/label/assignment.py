"""Who labels what: each item goes to R distinct annotators, never twice to the same one, items with
the fewest labels first; check items (known answer) go to every annotator, one in every N.

An item handed out is leased to its annotator (``assignments.state = 'open'``) and counts toward its
R until answered or until the lease runs out (``lease_s``); then it goes back to the pool, and a late
answer from the annotator who had it is still accepted. A skip ("can't judge") frees the slot for
another annotator; a tie is a judgement and counts. An annotator who reloads the page gets back the
items still open for them, in the order they were handed out, so nothing is lost or shown twice.

Counters: ``items.n_active`` = labels (not skips) + open leases, ``items.n_labels`` = labels (not
skips); both change only inside the writing transactions below.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from pipeline.label.storage import Cursor, Database, now

SUBMISSION_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
SPECIAL = ("tie", "skip")
_rng = random.SystemRandom()


@dataclass(frozen=True)
class Policy:
    per_item: int = 3  # R
    lease_s: float = 600.0
    check_every: int = 0  # 0: no check items


class Refused(Exception):
    """A request the annotator cannot make: an HTTP status and a message for them."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _expire(c: Cursor, cutoff: float) -> None:
    c.execute(
        "UPDATE items SET n_active = n_active - (SELECT COUNT(*) FROM assignments a WHERE a.item_id = items.id "
        "AND a.state = 'open' AND a.assigned_at < ?) WHERE is_check = 0 AND id IN "
        "(SELECT item_id FROM assignments WHERE state = 'open' AND assigned_at < ?)",
        (cutoff, cutoff),
    )
    c.execute("UPDATE assignments SET state = 'expired' WHERE state = 'open' AND assigned_at < ?", (cutoff,))


def _pick(c: Cursor, me: int, policy: Policy) -> tuple[int, int, int] | None:
    """(item id, is_check, number of images) of the next item for annotator ``me``, or None."""
    not_mine = "NOT EXISTS (SELECT 1 FROM assignments a WHERE a.annotator_id = ? AND a.item_id = items.id)"
    if policy.check_every:
        given = c.execute("SELECT COUNT(*) FROM assignments WHERE annotator_id = ?", (me,)).fetchone()[0]
        if (int(given) + 1) % policy.check_every == 0:
            row = c.execute(
                f"SELECT id, is_check, images FROM items WHERE is_check = 1 AND closed = 0 AND {not_mine} "
                "ORDER BY position LIMIT 1",
                (me,),
            ).fetchone()
            if row is not None:
                return int(row[0]), 1, len(json.loads(row[2]))
    row = c.execute(
        f"SELECT id, is_check, images FROM items WHERE is_check = 0 AND closed = 0 AND n_active < ? AND {not_mine} "
        "ORDER BY n_active, position LIMIT 1",
        (policy.per_item, me),
    ).fetchone()
    return None if row is None else (int(row[0]), 0, len(json.loads(row[2])))


def next_items(db: Database, me: int, n: int, policy: Policy) -> list[dict]:
    """Up to ``n`` items for annotator ``me``: their open ones first, then new ones. Each item:
    key, kind, caption, ``display`` (the order to show its images in: indices into the item's
    images, shuffled per annotator so that no side is favoured)."""
    t = now()
    with db.tx(write=True) as c:
        _expire(c, t - policy.lease_s)
        rows = c.execute(
            "SELECT a.item_id, a.display FROM assignments a JOIN items i ON i.id = a.item_id "
            "WHERE a.annotator_id = ? AND a.state = 'open' AND i.closed = 0 ORDER BY a.assigned_at, a.item_id",
            (me,),
        ).fetchall()
        chosen = [(int(r[0]), json.loads(r[1])) for r in rows][:n]
        while len(chosen) < n:
            pick = _pick(c, me, policy)
            if pick is None:
                break
            item_id, is_check, k = pick
            display = _rng.sample(range(k), k)
            c.execute(
                "INSERT INTO assignments (annotator_id, item_id, state, assigned_at, display) VALUES (?, ?, 'open', ?, ?)",
                (me, item_id, t, json.dumps(display)),
            )
            if not is_check:
                c.execute("UPDATE items SET n_active = n_active + 1 WHERE id = ?", (item_id,))
            chosen.append((item_id, display))
        out = []
        for item_id, display in chosen:
            key, kind, caption = c.execute(
                "SELECT key, kind, caption FROM items WHERE id = ?", (item_id,)
            ).fetchone()
            out.append({"key": key, "kind": kind, "caption": caption, "display": display})
    return out


def record_label(
    db: Database, me: int, item_key: str, choice: str, submission_id: str, duration_ms: int
) -> tuple[int, bool]:
    """Store one label; returns (label id, whether it was a retry of an earlier submission).

    ``choice``: the index of the chosen image in the item (as a string), ``tie`` or ``skip``.
    ``duration_ms``: how long the item was on the annotator's screen; time shown = time answered
    minus that, measured on the server's clock (no client clock is trusted)."""
    if not SUBMISSION_RE.fullmatch(submission_id):
        raise Refused(422, "submission_id: 8-64 characters of A-Z a-z 0-9 _ -")
    t = now()
    with db.tx(write=True) as c:
        item = c.execute(
            "SELECT id, images, is_check, closed FROM items WHERE key = ?", (item_key,)
        ).fetchone()
        if item is None:
            raise Refused(404, f"no item {item_key!r}")
        item_id, k, is_check = int(item[0]), len(json.loads(item[1])), bool(item[2])
        prev = c.execute(
            "SELECT id, item_id, choice FROM labels WHERE annotator_id = ? AND submission_id = ?",
            (me, submission_id),
        ).fetchone()
        if prev is not None:
            if int(prev[1]) == item_id and prev[2] == choice:
                return int(prev[0]), True  # a retried request: acknowledged again, stored once
            raise Refused(409, "this submission_id was used for another label")
        if item[3]:
            raise Refused(409, "this item's round has closed: the label was not needed, thank you")
        a = c.execute(
            "SELECT state, assigned_at, display FROM assignments WHERE annotator_id = ? AND item_id = ?",
            (me, item_id),
        ).fetchone()
        if a is None:
            raise Refused(403, "this item was not given to you")
        state, assigned_at, display = a[0], float(a[1]), json.loads(a[2])
        if state in ("done", "skipped"):
            raise Refused(409, "you have labelled this item already")
        if choice not in SPECIAL and choice not in {str(i) for i in range(k)}:
            raise Refused(422, f"choice: expected an image index 0..{k - 1}, 'tie' or 'skip', got {choice!r}")
        pos = display.index(int(choice)) if choice not in SPECIAL else None
        shown_at = max(assigned_at, t - duration_ms / 1000.0)
        row = c.execute(
            "INSERT INTO labels (item_id, annotator_id, choice, shown_at, answered_at, duration_ms, display_pos, "
            "submission_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
            (item_id, me, choice, shown_at, t, int(duration_ms), pos, submission_id),
        ).fetchone()
        if row is None:
            raise Refused(409, "you have labelled this item already")
        skip = choice == "skip"
        c.execute(
            "UPDATE assignments SET state = ? WHERE annotator_id = ? AND item_id = ?",
            ("skipped" if skip else "done", me, item_id),
        )
        # an open lease turns into a label (or is freed by a skip); an expired one no longer counted
        active = (
            0 if is_check else {("open", False): 0, ("open", True): -1}.get((state, skip), 0 if skip else 1)
        )
        c.execute(
            "UPDATE items SET n_active = n_active + ?, n_labels = n_labels + ? WHERE id = ?",
            (active, 0 if skip else 1, item_id),
        )
    return int(row[0]), False


def progress(db: Database, me: int, per_item: int) -> dict:
    """The annotator's own count and what is left in the campaign."""
    with db.tx() as c:
        mine = c.execute("SELECT COUNT(*) FROM labels WHERE annotator_id = ?", (me,)).fetchone()[0]
        items, left = c.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN n_labels < ? THEN 1 ELSE 0 END), 0) FROM items WHERE is_check = 0 AND closed = 0",
            (per_item,),
        ).fetchone()
    return {"labelled_by_you": int(mine), "items": int(items), "items_left": int(left)}
