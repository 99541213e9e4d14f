"""Annotators and admins: random sign-in tokens, stored as their SHA-256 only.

A token is 32 random bytes (256 bits), so a fast hash is enough: there is nothing to guess, and the
database never holds a usable token. Every request's identity comes from its token alone.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from pipeline.errors import UserError
from pipeline.label.storage import Database, now

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
ROLES = ("annotator", "admin")


@dataclass(frozen=True)
class Person:
    id: int
    name: str
    user_id: int  # Pick-a-Pic's user_id column (int64), stable for the campaign
    role: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_person(
    db: Database, name: str, role: str = "annotator", user_id: int | None = None
) -> tuple[Person, str]:
    """Create an annotator or admin; returns them and their token (shown once, never stored)."""
    if not NAME_RE.fullmatch(name):
        raise UserError(
            f"name {name!r}: use 1-64 letters, digits, '_', '.', '@', '-' (starting with a letter or digit)"
        )
    if role not in ROLES:
        raise UserError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    token = secrets.token_urlsafe(32)
    with db.tx(write=True) as c:
        if c.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
            raise UserError(f"name {name!r} exists already (reset-token gives it a new token)")
        if user_id is None:
            user_id = int(c.execute("SELECT COALESCE(MAX(user_id), 0) + 1 FROM annotators").fetchone()[0])
        elif c.execute("SELECT 1 FROM annotators WHERE user_id = ?", (user_id,)).fetchone():
            raise UserError(f"user_id {user_id} belongs to someone else")
        pid = c.execute(
            "INSERT INTO annotators (name, user_id, role, token_hash, active, created_at) VALUES (?, ?, ?, ?, 1, ?) "
            "RETURNING id",
            (name, user_id, role, hash_token(token), now()),
        ).fetchone()[0]
    return Person(int(pid), name, int(user_id), role), token


def reset_token(db: Database, name: str) -> str:
    """A new token for ``name`` (the old one stops working); also re-activates a revoked person."""
    token = secrets.token_urlsafe(32)
    with db.tx(write=True) as c:
        row = c.execute(
            "UPDATE annotators SET token_hash = ?, active = 1 WHERE name = ? RETURNING id",
            (hash_token(token), name),
        ).fetchone()
    if row is None:
        raise UserError(f"no annotator or admin named {name!r}")
    return token


def revoke(db: Database, name: str) -> None:
    """The person's token stops working; their labels stay."""
    with db.tx(write=True) as c:
        if (
            c.execute("UPDATE annotators SET active = 0 WHERE name = ? RETURNING id", (name,)).fetchone()
            is None
        ):
            raise UserError(f"no annotator or admin named {name!r}")


def authenticate(db: Database, token: str | None) -> Person | None:
    if not token or len(token) > 256:
        return None
    with db.tx() as c:
        row = c.execute(
            "SELECT id, name, user_id, role FROM annotators WHERE token_hash = ? AND active = 1",
            (hash_token(token),),
        ).fetchone()
    return None if row is None else Person(int(row[0]), row[1], int(row[2]), row[3])


def list_people(db: Database) -> list[dict]:
    with db.tx() as c:
        rows = c.execute(
            "SELECT a.name, a.user_id, a.role, a.active, a.created_at, "
            "(SELECT COUNT(*) FROM labels l WHERE l.annotator_id = a.id) FROM annotators a ORDER BY a.id"
        ).fetchall()
    return [
        {
            "name": r[0],
            "user_id": int(r[1]),
            "role": r[2],
            "active": bool(r[3]),
            "created_at": r[4],
            "labels": int(r[5]),
        }
        for r in rows
    ]
