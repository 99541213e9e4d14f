"""Local servers for the labelling service's tests and load benchmark, all on loopback ports:

    with TempPostgres() as pg:           # a real PostgreSQL: initdb + postgres in a temporary folder
        url = pg.create_database("t1")   # postgresql://label@127.0.0.1:PORT/t1
    srv = LabelServer(["source=...", "db=..."]).start()   # python -m stages.label serve, a free port
    srv.kill()                                             # SIGKILL, as a crash would

PostgreSQL refuses to run as root: as root the server runs as the ``nobody`` user (``runuser``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from pipeline.engine.dist import free_port


def _pg_bin() -> Path:
    """$PG_BIN, else the newest /usr/lib/postgresql/N/bin (Debian's layout)."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


ROOT = Path(__file__).resolve().parents[1]


def available() -> str | None:
    """None when a server can be started here, else why not."""
    if not (PG_BIN / "initdb").is_file() or not (PG_BIN / "pg_ctl").is_file():
        return f"no PostgreSQL server binaries in {PG_BIN} (apt-get install postgresql, or set PG_BIN)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    return None


class TempPostgres:
    """``durable=False`` turns fsync off: for tests, where the server itself never crashes (it makes
    CREATE DATABASE and commits cheap); a benchmark keeps the default."""

    def __init__(self, user: str = "label", durable: bool = True):
        self.user = user
        self.durable = durable
        self.port = 0
        self.dir: Path | None = None

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        p = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if p.returncode:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}"
            )

    def start(self) -> TempPostgres:
        why = available()
        if why:
            raise RuntimeError(why)
        self.dir = Path(tempfile.mkdtemp(prefix="pg-"))
        data = self.dir / "data"
        data.mkdir()
        if os.geteuid() == 0:
            self.dir.chmod(0o755)
            shutil.chown(data, "nobody")
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(data),
            "-U",
            self.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.port = free_port()
        opts = f"-p {self.port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(data / "server.log"), "-w", "-o", opts, "start"
        )
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LabelServer:
    """``python -m stages.label serve`` in a child process on a free loopback port."""

    def __init__(
        self, overrides: list[str], config: str = "configs/label/default.yaml", log: Path | None = None
    ):
        self.overrides = overrides
        self.config = config
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> LabelServer:
        self.port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "stages.label",
            "serve",
            "--config",
            self.config,
            *self.overrides,
            f"server.port={self.port}",
            "server.log_level=warning",
        ]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        # its own process group, so that kill() also reaches uvicorn's worker processes
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"label server exited with {self.proc.returncode} (log: {self.log})")
            try:
                if httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"label server did not answer within {timeout} s (log: {self.log})")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LabelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
