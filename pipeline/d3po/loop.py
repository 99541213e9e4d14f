"""D3PO's online loop: rounds of sample -> feedback -> train -> evaluate, one training run
(``stages.online`` is its command line).

Round r (``<out>/round_NNN/``): (a) sample the training prompts with the current policy (round 0: the
base UNet; later: this run's export, ``<out>/run``; ``pipeline.d3po.sampling``), (b) decide their
preferences (``pipeline.d3po.feedback``), (c) ``stages.train`` continues the one run ``<out>/run`` up
to (r + 1) x ``steps_per_round`` optimizer steps on this round's trajectories (a subprocess, torchrun
for ``train_nproc`` > 1: DeepSpeed sets up a process group; the reference stays the frozen base), (d)
samples the fixed evaluation prompts with fixed seeds with the new policy and scores them with the
feedback's rewards (``pipeline.d3po.round_report``: ``scores.json``, a grid; the round's
``report.json``).

The loop only orchestrates. Each phase ends with an atomic ``<phase>.done`` marker: a rerun of the same
command skips finished phases and redoes an unfinished one, which is safe because every phase is
restart-safe by itself (sampling skips finished shards, feedback rewrites identical bytes, train
resumes from its latest checkpoint exactly), so a killed loop ends with the same weights and rewards
as an uninterrupted one. A marker is written last and by atomic rename, so a killed loop leaves
either a finished phase or an unfinished one, never a half-written marker.

Every phase runs in a child process (sample, feedback and eval as ``python -m stages.online --phase``,
reading ``<out>/config.yaml``; train as ``stages.train``), and the loop itself loads no model and never
touches the GPU: a process's CUDA memory (the caching allocator's blocks, the context) is only given
back when it exits, so a sampler or scorer in the loop's own process would keep gigabytes from the
trainer on the same GPU. Each child dies with the loop (Linux: ``PR_SET_PDEATHSIG``), so a killed loop
leaves nothing writing to its folder.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from pipeline.config import (
    flatten,
    load_config,
    parse_overrides,
    read_config_file,
    to_dict,
    write_resolved,
)
from pipeline.d3po import feedback, sampling
from pipeline.d3po.rewards import SCORER_REWARDS
from pipeline.d3po.round_report import (
    eval_summary,
    evaluate_policy,
    plot_learning,
    plot_rewards,
    round_metrics,
    round_row,
    round_table,
    win_rate,
)
from pipeline.errors import ConfigError, UserError
from pipeline.io import write_json_atomic
from pipeline.label import rounds
from pipeline.label.export import PREFERENCES
from pipeline.label.export import export as export_labels
from pipeline.label.storage import Database
from pipeline.schema.feedback import FeedbackConfig
from pipeline.schema.label import LabelConfig
from pipeline.schema.online import OnlineConfig
from pipeline.schema.sample import SampleConfig
from pipeline.schema.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository: the children import from it
PHASES = ("sample", "feedback", "train", "eval")
HUMAN_PHASES = ("sample", "label", "feedback", "train", "eval")  # feedback from people
PHASE_MODE = "--phase"  # python -m stages.online --phase CONFIG PHASE ROUND: one phase, in a child


def marker(folder: Path, phase: str) -> Path:
    return folder / f"{phase}.done"


def read_done(folder: Path, phase: str) -> dict | None:
    """The phase's marker (what it recorded), or None when the phase has not finished."""
    p = marker(folder, phase)
    return json.loads(p.read_text()) if p.is_file() else None


def write_done(folder: Path, phase: str, info: dict) -> None:
    """The phase's marker, written last (atomically) when the phase has finished."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker(folder, phase), info, indent=2)


def round_seed(seed: int, r: int) -> int:
    """Round r's seed: a hash of (seed, r), so that loops started with seeds s and s + 1 share no round's
    noise (``seed + r`` made round 1 of seed s round 0 of seed s + 1)."""
    return int(np.random.SeedSequence([seed, r]).generate_state(1, np.uint32)[0] >> 1)


class Loop:
    """One online loop (``cfg``): its stages' configs, checked before anything runs, its phases and
    rounds."""

    def __init__(self, cfg: OnlineConfig):
        self.cfg = cfg
        self.out = Path(cfg.out).resolve()
        self.run_dir = self.out / "run"
        self.model = str(Path(cfg.model.path).resolve())
        self.prompts = self._file("prompts", cfg.prompts)
        self.eval_prompts = self._file("eval.prompts", cfg.eval.prompts)
        self.configs = {
            s: self._file(f"{s}_config", getattr(cfg, f"{s}_config")) for s in ("sample", "feedback", "train")
        }
        self.human = self._feedback_source() == "human"
        self.label_db = cfg.label.db or str(self.out / "labels.db")
        self._server: subprocess.Popen | None = None
        if not (Path(self.model) / "model_index.json").is_file():
            raise UserError(
                f"model.path={cfg.model.path}: not a diffusers model folder (no model_index.json)"
            )
        self._check_stage_configs()

    @staticmethod
    def _file(key: str, path: str) -> str:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{key}={path}: no such file")
        return str(p.resolve())

    # ------------------------------------------------------------------ the stages' configs

    def _load(self, stage: str, cls: type, overrides: list[str]):
        """A stage's config: its file, the user's overrides, then the loop's own keys (which win). A bad
        value fails here, before round 0 samples anything, naming the override list it came from."""
        user = list(getattr(self.cfg, f"{stage}_overrides"))
        try:
            return load_config(cls, self.configs[stage], user + overrides)
        except ConfigError as e:
            raise UserError(
                f"{stage}_config={getattr(self.cfg, f'{stage}_config')} with {stage}_overrides={user}: {e}"
            ) from None

    def _feedback_source(self) -> str:
        """The feedback config's ``source`` (its file, then the user's overrides), read before the config
        is checked: with ``human`` the loop sets the label file of each round itself."""
        given = dict(parse_overrides(list(self.cfg.feedback_overrides))[0])
        return str(given.get("source", read_config_file(self.configs["feedback"]).get("source", "rewards")))

    def label_cfg(self) -> LabelConfig:
        """The labelling service's config: its file, the loop's ``label.overrides``, the campaign's db."""
        try:
            return load_config(
                LabelConfig, self.cfg.label.config, [*self.cfg.label.overrides, f"db={self.label_db}"]
            )
        except ConfigError as e:
            raise UserError(f"label.config={self.cfg.label.config} with label.overrides: {e}") from None

    def sample_cfg(self, prompts: str, out: Path, seed: int, unet: str | None) -> SampleConfig:
        o = [
            f"model.path={self.model}",
            f"prompts.source={prompts}",
            f"output.dir={out}",
            f"sampler.seed={seed}",
        ]
        if unet is not None:
            o.append(f"model.unet={unet}")
        return self._load("sample", SampleConfig, o)

    def feedback_cfg(self, traj: Path, out: Path, r: int = 0) -> FeedbackConfig:
        """Round r's feedback. Pair flips (``flip_by=pair``) are drawn afresh every round (a hash of
        ``flip_seed`` and r), as a labeller's slips fall on different pairs each time; ``flip_by=prompt`` keeps the same
        prompts flipped in every round: a minority with its own taste on those prompts."""
        base = [f"trajectories={traj}", f"out={out}"]
        if self.human:  # the round's own labels (do_label's export)
            base.append(f"human={self.round_dir(r) / 'labels' / PREFERENCES}")
        fb = self._load("feedback", FeedbackConfig, base)
        if r and fb.flip_rate > 0 and fb.flip_by == "pair":
            fb = self._load("feedback", FeedbackConfig, [*base, f"flip_seed={round_seed(fb.flip_seed, r)}"])
        return fb

    def train_overrides(self, r: int) -> list[str]:
        rd = self.round_dir(r)
        return [
            f"model.path={self.model}",
            f"data.shards={rd / 'sample'}",
            f"data.preferences={rd / 'feedback'}",
            f"output.dir={self.run_dir}",
            f"train.max_steps={(r + 1) * self.cfg.steps_per_round}",
            "checkpoint.export=true",
        ]

    def _check_stage_configs(self) -> None:
        self.sample_cfg(self.prompts, self.out / "x", 0, None)
        fb = self.feedback_cfg(self.out / "x", self.out / "y")
        if self.human:
            lc = self.label_cfg()
            if lc.source is not None:
                raise UserError(
                    f"label.overrides: source={lc.source}; the loop adds each round's samples itself (drop it)"
                )
            if not self.cfg.eval.rewards:
                raise UserError(
                    "eval.rewards: required with feedback from people (source=human): the reward the "
                    "evaluation scores every round, e.g. [aesthetic] (people label the training samples only)"
                )
        tr = self._load("train", TrainConfig, self.train_overrides(0))
        if tr.objective.name not in ("d3po", "adaptive_d3po"):
            raise UserError(
                f"train_config={self.cfg.train_config}: objective.name={tr.objective.name}; the online loop "
                "trains objective.name=d3po (or adaptive_d3po) on its sampled trajectories"
            )
        for n in self.cfg.eval.rewards or []:
            if n.lstrip("-") in SCORER_REWARDS and not getattr(fb.scorers, n.lstrip("-")):
                raise UserError(
                    f"eval.rewards: {n} needs its scorer folder in the feedback config "
                    f"(feedback_overrides=[scorers.{n.lstrip('-')}=FOLDER])"
                )

    # ------------------------------------------------------------------ phases

    def round_dir(self, r: int) -> Path:
        return self.out / f"round_{r:03d}"

    def phase(self, folder: Path, name: str, fn, *args) -> dict:
        """Run ``fn`` unless the phase's marker says it finished; the marker (with its seconds) is
        written last. The seconds are those of the run that finished it (a redone phase: its last try)."""
        done = read_done(folder, name)
        if done is not None:
            print(f"  {folder.name}/{name}: done before, skipped", flush=True)
            return done
        print(f"  {folder.name}/{name} ...", flush=True)
        t0 = time.time()
        info = fn(*args) or {}
        done = {**info, "seconds": round(time.time() - t0, 3)}
        write_done(folder, name, done)
        return done

    def policy(self, r: int) -> str | None:
        """What round r samples from: the base UNet (round 0), then this run's export (full UNet or LoRA,
        as stages.sample resolves a run folder)."""
        return None if r == 0 else str(self.run_dir)

    def env(self) -> dict[str, str]:
        """The children's environment: this repository importable from any working directory."""
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return dict(os.environ, PYTHONPATH=path)

    def in_child(self, phase: str, r: int) -> None:
        """Run round r's ``phase`` (r = -1: the base's eval) in a child process (``run_phase``), with
        the loop's working directory (relative paths resolve as here) and its stdout / stderr."""
        cfg = str(self.out / "config.yaml")
        cmd = [sys.executable, "-m", "stages.online", PHASE_MODE, cfg, phase, str(r)]
        rc = spawn(cmd, cwd=os.getcwd(), env=self.env()).returncode
        if rc != 0:
            where = "the base's eval" if r < 0 else f"round {r}: {phase}"
            raise PhaseFailed(rc, f"{where} exited {rc} (its error above)")

    def run_phase(self, phase: str, r: int) -> None:
        """The work of one phase, done in this process (the child's side of ``in_child``)."""
        if phase == "sample":
            c = self.sample_cfg(
                self.prompts, self.round_dir(r) / "sample", round_seed(self.cfg.seed, r), self.policy(r)
            )
            print(sampling.sample_trajectories(c))
        elif phase == "feedback":
            rd = self.round_dir(r)
            feedback.decide_preferences(self.feedback_cfg(rd / "sample", rd / "feedback", r))
        elif phase == "eval":
            self.evaluate(*self.eval_target(r))
        else:
            raise UserError(f"{PHASE_MODE} {phase}: not a phase run in a child (sample, feedback, eval)")

    def do_sample(self, r: int) -> dict:
        self.in_child("sample", r)
        c = self.sample_cfg(
            self.prompts, self.round_dir(r) / "sample", round_seed(self.cfg.seed, r), self.policy(r)
        )
        return {"unet": c.model.unet or "base", "sampler_seed": c.sampler.seed}

    def serve_labels(self, lc: LabelConfig) -> None:
        """The labelling service (``stages.label serve`` on the campaign's db, no source: it serves what
        the loop adds), started once and kept for the loop's lifetime; a child that dies with the loop."""
        if not self.cfg.label.serve or (self._server is not None and self._server.poll() is None):
            return
        cmd = [
            sys.executable,
            "-m",
            "stages.label",
            "serve",
            "--config",
            str(Path(self.cfg.label.config).resolve()),
            *self.cfg.label.overrides,
            f"db={self.label_db}",
        ]
        log_file = open(self.out / "label_server.log", "ab")  # noqa: SIM115 - the server's lifetime
        self._server = spawn_background(
            cmd, cwd=os.getcwd(), env=self.env(), stdout=log_file, stderr=subprocess.STDOUT
        )
        url = f"http://{lc.server.host}:{lc.server.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self._server.poll() is not None:
                tail = (self.out / "label_server.log").read_text(errors="replace").splitlines()[-10:]
                raise PhaseFailed(2, "the labelling service exited: " + " | ".join(tail))
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        else:
            raise PhaseFailed(2, f"the labelling service did not answer at {url}/healthz within 120 s")
        print(
            f"  labelling service: {url}/ (admin: {url}/admin; log: {self.out / 'label_server.log'})",
            flush=True,
        )

    def stop_labels(self) -> None:
        if self._server is not None and self._server.poll() is None:
            self._server.terminate()
            try:
                self._server.wait(10)
            except subprocess.TimeoutExpired:
                self._server.kill()
        self._server = None

    def do_label(self, r: int) -> dict:
        """Round r's samples go to the labelling service; the round closes when every item has R labels,
        at ``label.deadline_min``, or when an admin closes it; then its labels alone are exported to
        ``round_NNN/labels`` (Pick-a-Pic parquet + image_preferences.jsonl) for the feedback stage."""
        lc = self.label_cfg()
        rd = self.round_dir(r)
        db = Database(self.label_db)
        try:
            state = rounds.open_round(db, r, rd / "sample", lc.items.mode, self.cfg.label.deadline_min)
            self.serve_labels(lc)
            R = lc.assignment.per_item
            print(
                f"  round {r}: {state['items']} item(s) to label, {R} label(s) each"
                + (
                    f", deadline {time.strftime('%H:%M:%S', time.localtime(state['deadline']))}"
                    if state["deadline"]
                    else ""
                ),
                flush=True,
            )
            last = None
            while (why := rounds.should_close(db, r, R)) is None:
                p = rounds.progress(db, r, R)
                if (p["complete"], p["started"]) != last:
                    print(
                        f"  round {r}: {p['complete']}/{p['items']} complete, {p['started']} started",
                        flush=True,
                    )
                    last = (p["complete"], p["started"])
                time.sleep(self.cfg.label.poll_s)
            state = rounds.close_round(db, r, why)
            summary = export_labels(db, rd / "labels", online_round=r)
            p = rounds.progress(db, r, R)
        finally:
            db.close()
        print(
            f"  round {r}: closed ({state['closed_by']}): {summary['labels']} label(s) exported", flush=True
        )
        return {"closed_by": state["closed_by"], "labels": summary["labels"], **p}

    def do_feedback(self, r: int) -> dict:
        self.in_child("feedback", r)
        return {}

    def do_train(self, r: int) -> dict:
        rd = self.round_dir(r)
        # eval samples of this round made before its training finished (markers removed by hand) would
        # be kept by the sample stage, which knows the policy by path, not by weights
        shutil.rmtree(rd / "eval", ignore_errors=True)
        args = ["--config", self.configs["train"], *self.cfg.train_overrides, *self.train_overrides(r)]
        n = self.cfg.train_nproc
        launcher = (
            [] if n == 1 else ["torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m"]
        )
        cmd = [sys.executable, "-m", *launcher, "stages.train", *args]
        log_file = rd / "train.log"
        with open(log_file, "ab") as f:
            f.write(f"\n$ {' '.join(cmd)}\n".encode())
            f.flush()
            p = spawn(cmd, cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
            raise PhaseFailed(
                p.returncode, f"round {r}: stages.train exited {p.returncode} (log: {log_file}):\n{tail}"
            )
        first = r * self.cfg.steps_per_round + 1
        return {
            "metrics": round_metrics(
                self.run_dir / "metrics.jsonl", first, (r + 1) * self.cfg.steps_per_round
            )
        }

    def eval_target(self, r: int) -> tuple[Path, str | None]:
        """(folder, policy) of round r's evaluation; r = -1: the base's, before any training."""
        if r < 0:
            return self.out / "eval_base", None
        return self.round_dir(r) / "eval", str(self.run_dir)

    def do_eval(self, r: int) -> dict:
        self.in_child("eval", r)
        return eval_summary(self.eval_target(r)[0])

    def evaluate(self, folder: Path, unet: str | None) -> None:
        """Fresh samples of the eval prompts with the eval seed, scored with the feedback's rewards
        (``scores.json``, written last, and ``grid.png``: ``pipeline.d3po.round_report``)."""
        c = self.sample_cfg(self.eval_prompts, folder / "samples", self.cfg.eval.seed, unet)
        fb = self.feedback_cfg(folder / "samples", folder)
        evaluate_policy(c, fb, self.cfg.eval.rewards or fb.rewards, folder, unet)

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        try:
            return self._run()
        finally:
            self.stop_labels()

    def _run(self) -> int:
        self.check_same_loop()
        self.out.mkdir(parents=True, exist_ok=True)
        write_resolved(self.cfg, self.out / "config.yaml")
        t0 = time.time()
        print(
            f"online loop -> {self.out}: {self.cfg.rounds} rounds x {self.cfg.steps_per_round} steps",
            flush=True,
        )
        base = self.phase(self.out / "eval_base", "eval", self.do_eval, -1)
        rows = [{"round": -1, "eval": base["rewards"], "seconds": {"eval": base["seconds"]}}]
        for r in range(self.cfg.rounds):
            rd = self.round_dir(r)
            rd.mkdir(parents=True, exist_ok=True)
            print(f"round {r}", flush=True)
            done = {"sample": self.phase(rd, "sample", self.do_sample, r)}
            if self.human:
                done["label"] = self.phase(rd, "label", self.do_label, r)
            done["feedback"] = self.phase(rd, "feedback", self.do_feedback, r)
            done["train"] = self.phase(rd, "train", self.do_train, r)
            done["eval"] = self.phase(rd, "eval", self.do_eval, r)
            fb = json.loads((rd / "feedback" / "summary.json").read_text())
            report = round_row(r, done, fb, HUMAN_PHASES if self.human else PHASES)
            report["win_rate"] = win_rate(rd / "eval", self.out / "eval_base")
            if self.human:
                report["labels"] = {
                    k: done["label"].get(k) for k in ("closed_by", "labels", "items", "complete")
                }
            write_json_atomic(rd / "report.json", report, indent=2)
            rows.append(report)
        reward_names = list(base["rewards"])
        plot_rewards(rows, reward_names, self.out / "reward_by_round.png")
        plot_learning(rows, reward_names, self.out / "learning_by_round.png")
        summary = {"rounds": rows, "rewards": reward_names, "out": str(self.out)}
        write_json_atomic(self.out / "report.json", summary, indent=2)
        print(round_table(rows, reward_names))
        print(f"online loop done in {time.time() - t0:.1f} s -> {self.out / 'report.json'}")
        return 0

    def check_same_loop(self) -> None:
        """A rerun must be the same loop: the finished phases' markers stand for this config's work. Only
        ``rounds`` may change (more rounds continue the loop; fewer stop it early)."""
        saved = self.out / "config.yaml"
        if not saved.is_file():
            return
        a, b = flatten(yaml.safe_load(saved.read_text())), flatten(to_dict(self.cfg))
        diffs = [
            f"{k}: {a.get(k)!r} before, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b))
            if k != "rounds" and a.get(k) != b.get(k)
        ]
        if diffs:
            raise UserError(
                f"out={self.cfg.out} holds a loop with another config; use a new out, or restore:\n  "
                + "\n  ".join(diffs)
            )


class PhaseFailed(Exception):
    def __init__(self, rc: int, message: str):
        super().__init__(message)
        self.rc = rc


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _libc_prctl():
    """libc's ``prctl``, resolved now, at import: ``_die_with_parent`` runs in the forked child before
    exec, a copy of a process whose other threads (CUDA's, PyTorch's pools, the tokenizers') vanished
    holding whatever locks they held. Loading a library there (``dlopen`` takes the loader's lock, and
    allocates) can deadlock; a call of a function resolved beforehand is a plain system call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


_PRCTL = _libc_prctl()
_SIGKILL = int(signal.SIGKILL)


def _die_with_parent(parent: int) -> None:
    """preexec_fn (Linux): the child gets SIGKILL when the loop dies, so a killed loop leaves no trainer
    or sampler writing to its folder while a rerun starts another one. Only system calls: no import,
    no library loading (see ``_libc_prctl``). The signal follows the thread that started the child (the
    loop's main thread, which lives as long as the loop); a loop that died before the prctl is caught
    by the parent check."""
    _PRCTL(PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), _SIGKILL)


def spawn_background(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` of a child that dies with this process (where the platform allows)."""
    if _PRCTL is not None:
        parent = os.getpid()
        kwargs["preexec_fn"] = lambda: _die_with_parent(parent)
    return subprocess.Popen(cmd, **kwargs)


def spawn(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a child that dies with this process (where the platform allows)."""
    if _PRCTL is not None:
        parent = os.getpid()
        kwargs["preexec_fn"] = lambda: _die_with_parent(parent)
    return subprocess.run(cmd, **kwargs)
