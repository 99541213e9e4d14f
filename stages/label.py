"""Stage label: a web app where people choose the better image; its export is Pick-a-Pic v2 data.

    python -m stages.label add-annotator --db labels.db alice      # prints alice's sign-in link
    python -m stages.label add-admin --db labels.db ana            # the admin page's link
    python -m stages.label serve --config configs/label/default.yaml source=demo/pickapic/heldout db=labels.db
    python -m stages.label export --db labels.db --out data/my_prefs   # Pick-a-Pic v2 parquet + D3PO file
    python -m stages.label status --db labels.db                   # the admin page's audit, as text
    python -m stages.label annotators | reset-token NAME | revoke NAME  --db labels.db

``--db`` (and the config's ``db``) is a SQLite file or a postgresql:// URL; the database holds the
campaign: annotators, items (with references to their images in the source) and labels.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import uvicorn

from pipeline import cli
from pipeline.config import write_resolved
from pipeline.errors import UserError
from pipeline.label import app as label_app
from pipeline.label import people
from pipeline.label.audit import summary
from pipeline.label.export import export as export_labels
from pipeline.label.sources import load_source
from pipeline.label.storage import Database, load_items
from pipeline.schema.label import LabelConfig

log = logging.getLogger("stages.label")
PROG = "python -m stages.label"


def serve(cfg: LabelConfig) -> int:
    db = Database(cfg.db)
    it = cfg.items
    if cfg.source is not None:
        src = load_source(
            cfg.source, it.mode, it.max_items, it.shuffle, it.seed, cfg.checks.count, cfg.checks.column
        )
        counts = load_items(db, src.items, src.fingerprint, cfg.source)
        checks = sum(x.is_check for x in src.items)
        where = f"from {src.kind} source {cfg.source}" + (
            f", skipped {dict(src.skipped)}" if src.skipped else ""
        )
    else:  # what the database holds (an online loop's campaign adds each round's items)
        with db.tx() as c:
            n, checks = c.execute("SELECT COUNT(*), COALESCE(SUM(is_check), 0) FROM items").fetchone()
        counts = {"items": int(n), "new": 0}
        where = "already in the database (no source given)"
    db.set_meta("per_item", cfg.assignment.per_item)
    with db.tx() as c:
        people = c.execute(
            "SELECT COUNT(*) FROM annotators WHERE role = 'annotator' AND active = 1"
        ).fetchone()[0]
    db.close()
    url = f"http://{cfg.server.host}:{cfg.server.port}/"
    print(
        f"campaign {cfg.db}: {counts['items']} items ({counts['new']} new, {checks} checks) {where}"
        + f"; {people} active annotator(s); {cfg.assignment.per_item} labels per item\n"
        f"annotators: {url}   admin: {url}admin   (add people: {PROG} add-annotator --db {cfg.db} NAME)",
        flush=True,
    )
    if cfg.server.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: put it behind a TLS reverse proxy (README, 'Collect your own preferences')",
            cfg.server.host,
        )
    options = dict(
        host=cfg.server.host,
        port=cfg.server.port,
        proxy_headers=cfg.server.forwarded_allow_ips is not None,
        forwarded_allow_ips=cfg.server.forwarded_allow_ips,
        log_level=cfg.server.log_level,
        server_header=False,
        timeout_keep_alive=5,
    )
    if cfg.server.workers == 1:
        uvicorn.run(label_app.app_from_config(cfg), **options)
        return 0
    # several processes: each builds the app from the resolved config
    with tempfile.TemporaryDirectory(prefix="label-serve-") as tmp:
        os.environ[label_app.CONFIG_ENV] = str(write_resolved(cfg, Path(tmp) / "config.yaml"))
        uvicorn.run("pipeline.label.app:app_from_env", factory=True, workers=cfg.server.workers, **options)
    return 0


def _db(args, create: bool = False):
    return Database(args.db, create=create)


def _link(base: str, token: str, admin: bool) -> str:
    return f"{base.rstrip('/')}/{'admin' if admin else ''}#token={token}"


def add_person(args, role: str) -> int:
    p, token = people.add_person(_db(args, create=True), args.name, role, args.user_id)
    print(f"{p.role} {p.name} (user_id {p.user_id}); sign-in link (shown once, keep it private):")
    print(_link(args.url, token, role == "admin"))
    print(f"token: {token}")
    return 0


def reset_token(args) -> int:
    token = people.reset_token(_db(args), args.name)
    print(f"new sign-in link for {args.name} (the old one no longer works):")
    print(_link(args.url, token, args.admin))
    print(f"token: {token}")
    return 0


def revoke(args) -> int:
    people.revoke(_db(args), args.name)
    print(f"{args.name}: token revoked (their labels stay)")
    return 0


def annotators(args) -> int:
    rows = people.list_people(_db(args))
    print(f"{'name':<24} {'user_id':>8} {'role':<10} {'active':<6} {'labels':>7}")
    for r in rows:
        print(f"{r['name']:<24} {r['user_id']:>8} {r['role']:<10} {str(r['active']):<6} {r['labels']:>7}")
    return 0


def status(args) -> int:
    db = _db(args)
    s = summary(db, args.per_item or int(db.get_meta("per_item", 3)))
    alpha = "-" if s["alpha"] is None else f"{s['alpha']:.3f}"
    print(
        f"items complete {s['complete']} / {s['items']} ({s['per_item']} labels each), {s['started']} started; "
        f"{s['labels']} labels {s['choices']}; Krippendorff's alpha {alpha}"
    )
    print("annotators, furthest from the consensus first:")
    print(
        f"{'#':>3} {'annotator':<20} {'user_id':>8} {'labels':>7} {'skips':>6} {'agreement':>9} {'checks':>8} {'median s':>8}"
    )

    def f(x, pct=True):
        return "-" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.2f}")

    for i, a in enumerate(s["annotators"], 1):
        print(
            f"{i:>3} {a['annotator']:<20} {a['user_id']:>8} {a['labels']:>7} {a['skips']:>6} "
            f"{f(a['agreement']):>9} {f(a['check_accuracy']):>8} {f(a['median_s'], False):>8}"
        )
    return 0


def export(args) -> int:
    s = export_labels(_db(args), args.out, include_checks=not args.no_checks)
    print(
        f"exported {s['labels']} labels as {s['rows']} Pick-a-Pic rows in {len(s['files'])} file(s) to {args.out} "
        f"({s['choices']}); per-image preferences: {Path(args.out) / s['preferences']}"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the web app: --config FILE key=value ... (see configs/label/)")

    def cmd(name: str, help: str, fn):
        s = sub.add_parser(name, help=help)
        s.add_argument("--db", required=True, help="SQLite file or postgresql:// URL")
        s.set_defaults(fn=fn)
        return s

    for name, role in (("add-annotator", "annotator"), ("add-admin", "admin")):
        s = cmd(name, f"create an {role}; prints their sign-in link", lambda a, r=role: add_person(a, r))
        s.add_argument("name")
        s.add_argument(
            "--user-id", type=int, default=None, help="the Pick-a-Pic user_id (default: next free)"
        )
        s.add_argument("--url", default="http://127.0.0.1:8000/", help="the address people open")
    s = cmd("reset-token", "a new token for someone (the old one stops working)", reset_token)
    s.add_argument("name")
    s.add_argument("--url", default="http://127.0.0.1:8000/")
    s.add_argument("--admin", action="store_true", help="print the admin page's link")
    cmd("revoke", "stop someone's token; their labels stay", revoke).add_argument("name")
    cmd("annotators", "list annotators and admins", annotators)
    s = cmd("status", "progress and the per-annotator audit", status)
    s.add_argument(
        "--per-item", type=int, default=None, help="R (default: the one the campaign was served with)"
    )
    s = cmd("export", "Pick-a-Pic v2 parquet + image_preferences.jsonl", export)
    s.add_argument("--out", required=True, help="a new folder, or an earlier export to replace")
    s.add_argument("--no-checks", action="store_true", help="leave out labels of check items")
    return p


def cli_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "serve":
        return cli.run(f"{PROG} serve", LabelConfig, serve, argv[1:], "run the labelling web app")
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args) or 0)
    except UserError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli_main())
