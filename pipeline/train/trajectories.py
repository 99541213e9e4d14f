"""The trajectory workload: D3PO on sampled denoising trajectories (``stages.sample``) and the feedback
stage's preferences (``stages.feedback``), trained by the shared recipe (``stages/train.py``).

The training units are the *decided* pairs ``(w, l)`` of the preference file (ties carry no gradient:
they are skipped and counted). A pair trains at ``T = trained_timesteps(N, objective.d3po.timestep_fraction)``
of its N transitions; one micro-step is one timestep slot of a micro-batch of pairs, so a micro-batch
is read once and yielded T times (the authors' loop: ``for j in range(T)`` inside the accumulation).

Data position, a pure function of the micro-step ``m`` and the layout (decided pairs P, world W,
micro-batch B, T): with ``E = (P // (W B)) * T`` micro-steps per epoch,

    epoch = m // E,   batch = (m % E) // T,   slot = m % T

Epoch ``e`` shuffles the pairs with a generator seeded by ``(data.seed, e)``; rank ``r`` takes batch
``b`` as ``order[(b B + k) W + r]``, k < B (rank-strided: the ranks read disjoint pairs, and all of
an epoch's pairs but the last ``P mod (W B)``, which differ every epoch). Each pair's trained
timesteps are the first T of a permutation of 0..N-1 seeded by ``(data.seed, e, pair)``: a pair gets
its own timesteps at slot ``s`` (the authors draw a permutation per sample, too). Nothing depends on
what ran before, so a resumed run reads exactly what the uninterrupted one read.

Gradient accumulation: DeepSpeed accumulates ``train.grad_accum`` micro-steps per optimizer step
(``pipeline.engine.ds_config``, read by the shared engine). Here that must be T times the micro-batches
per step (the authors' ``gradient_accumulation_steps * num_train_timesteps``), so the gradient of one
optimizer step is the mean over all trained timesteps of its pairs; the workload checks the multiple
before any model loads and names the value to set, rather than rewriting the config behind the user's
back (the resolved ``config.yaml`` then states the accumulation that ran and reruns as given).

The step: ``cfg_noise_pred`` (the sampler's guidance) and ``ddim_step_with_logprob(prev_sample=x_{t-1})``
score the stored transition under the policy (with a gradient) and the reference (``no_grad``; LoRA:
adapters off). A pair's two trajectories go through one UNet call with the images in group order
(``i < j``), as the sampler batched them, then are mapped to (w, l); the ``D3PO`` objective turns the
four log-densities into the per-pair loss. The stored (sampled) log-probs travel along: the step logs
``sampled_gap``, |reference - sampled| per pair, which is 0 when the reference re-scores the sampler's
arithmetic exactly and grows when the trajectories came from another policy than the reference.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler

from pipeline.d3po.ddim import cfg_noise_pred, ddim_step_with_logprob
from pipeline.d3po.feedback_files import PARQUET, load_preferences
from pipeline.d3po.trajectories import index_arrays, load_uncond, read_array, read_manifest
from pipeline.data.shards import sha256_file
from pipeline.engine.context import RunContext
from pipeline.errors import UserError
from pipeline.losses.d3po import TransitionLogProbs, trained_timesteps, trajectory_margin
from pipeline.minority import auroc
from pipeline.models import inspect_model
from pipeline.train.workload import Models, Workload

log = logging.getLogger(__name__)


def _load_trajectory_manifest(cfg) -> dict:
    """The folder's manifest; a missing or foreign one names what objective.name=d3po needs."""
    try:
        return read_manifest(cfg.data.shards)
    except UserError as e:
        raise UserError(
            f"objective.name={cfg.objective.name} trains on 'trajectories' data (the output of stages.sample), "
            f"but data.shards={cfg.data.shards} is not such a folder: {e}"
        ) from None


def _inside(path: str | None, folder: str) -> bool:
    """Whether ``path`` lies inside ``folder`` (both resolved, so symlinks and relative spellings agree)."""
    if not path:
        return False
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def check_trajectories(cfg, manifest: dict):
    """The trajectories must come from the model being trained: the same model config (hash), and
    either its own UNet (on-policy samples; a ratio of 1 at the start) or a UNet of this very run
    (``output.dir``: its export or a checkpoint), which is the policy being continued, as the online
    loop (``stages.online``) samples round r > 0. Another UNet would be off-policy data. Returns the
    model's ``ModelInfo``."""
    m = manifest["model"]
    info = inspect_model(cfg.model.path or m["path"])
    if info.config_hash != m["config_hash"]:
        raise UserError(
            f"data.shards={cfg.data.shards} holds trajectories sampled with {m['path']} (config hash "
            f"{m['config_hash'][:12]}), not with model.path={info.path} ({info.config_hash[:12]}): sample "
            "them with the model being trained, or train the model they were sampled with"
        )
    unet = m.get("unet") or {"kind": "base"}
    if unet.get("kind") != "base" and not _inside(unet.get("path"), cfg.output.dir):
        raise UserError(
            f"data.shards={cfg.data.shards} was sampled with model.unet={unet.get('path')} ({unet.get('kind')}), "
            f"which is neither model.path={info.path}'s own UNet nor a UNet of this run (output.dir="
            f"{cfg.output.dir}): the policy would not be the one that sampled them (D3PO trains on-policy); "
            "sample with the base UNet or with this run's export"
        )
    res = manifest["sampler"]["resolution"]
    if cfg.data.resolution is not None and cfg.data.resolution != res:
        raise UserError(f"data.resolution={cfg.data.resolution} but the trajectories are {res} px")
    return info


def preference_folder(path: str) -> Path:
    """``data.preferences``: the feedback stage's out folder, or its ``preferences.parquet``."""
    p = Path(path)
    if p.is_file() and p.name == PARQUET:
        return p.parent
    if not p.exists():
        raise UserError(
            f"data.preferences={path}: no such file or folder (give the feedback stage's out folder, "
            f"python -m stages.feedback ... out=DIR, or its {PARQUET})"
        )
    if not p.is_dir():
        raise UserError(f"data.preferences={path}: not a feedback folder or its {PARQUET}")
    return p


class TrajectoryWorkload(Workload):
    pair_fields = {"user_id": torch.int64, "flipped": torch.bool, "true_agrees": torch.float32}

    def __init__(self, cfg, objective):
        super().__init__(cfg, objective)
        d = cfg.data
        # the data kind first: pair shards given to D3PO are the likelier mistake than a missing key
        self.shard_dir = Path(d.shards)
        self.manifest = _load_trajectory_manifest(cfg)
        if d.preferences is None:
            raise UserError(
                f"data.preferences: required for objective.name={cfg.objective.name} (the feedback stage's "
                "out folder: python -m stages.feedback --config configs/feedback/tiny.yaml "
                f"trajectories={d.shards} out=DIR)"
            )
        if d.flip_rate > 0:
            raise UserError(
                "data.flip_rate: D3PO preferences are flipped by the feedback stage (its flip_rate), where the "
                "flips are recorded; set data.flip_rate=0"
            )
        if d.sample_latents:
            raise UserError(
                "data.sample_latents: trajectories store the sampled latents themselves; set false"
            )
        self.info = check_trajectories(cfg, self.manifest)
        s = self.manifest["sampler"]
        self.n_steps, self.k = int(s["steps"]), int(s["images_per_prompt"])
        self.guidance, self.eta = float(s["guidance"]), float(s["eta"])
        self.T = trained_timesteps(self.n_steps, objective.timestep_fraction)
        if cfg.train.grad_accum % self.T:
            raise UserError(
                f"train.grad_accum={cfg.train.grad_accum}: D3PO accumulates over the trained timesteps of a "
                f"batch, so it must be a multiple of T={self.T} (int({self.n_steps} sampler steps x "
                f"objective.d3po.timestep_fraction={objective.timestep_fraction})); e.g. "
                f"train.grad_accum={self.T} (one micro-batch per optimizer step) or {2 * self.T} (two)"
            )
        if d.verify_sha256:
            bad = [
                x["name"]
                for x in self.manifest["shards"]
                if sha256_file(self.shard_dir / x["name"]) != x["sha256"]
            ]
            if bad:
                raise UserError(
                    f"data.verify_sha256: {len(bad)} file(s) in {d.shards} differ from the manifest: "
                    f"{', '.join(bad[:8])}; sample them again"
                )
        self.uncond_np = load_uncond(self.shard_dir, self.manifest["shapes"]["txt"][1])
        self.index = index_arrays(self.shard_dir, self.manifest)
        self._load_preferences(d.preferences)
        self._cache: tuple[tuple[int, int], dict] | None = None
        self.window: deque = deque(maxlen=max(cfg.train.auroc_window, 0))
        self._margins: tuple[tuple[int, int], torch.Tensor] | None = None

    # ------------------------------------------------------------------ checks

    def _load_preferences(self, path: str) -> None:
        folder = preference_folder(path)
        table, summary = load_preferences(folder)
        pfile = folder / PARQUET
        made_from = (summary.get("trajectories") or {}).get("manifest_sha256")
        ours = hashlib.sha256((self.shard_dir / "manifest.json").read_bytes()).hexdigest()
        if made_from is not None and made_from != ours:
            raise UserError(
                f"data.preferences={pfile} was made from another trajectory folder than data.shards="
                f"{self.shard_dir} (its manifest sha256 {made_from[:12]}, this one's {ours[:12]}): run "
                f"stages.feedback on {self.shard_dir}"
            )
        cols = table.to_pydict()
        unknown = sorted({k for k in cols["key"] if k not in self.index})
        if unknown:
            raise UserError(
                f"data.preferences={pfile} names {len(unknown)} prompt group(s) that data.shards="
                f"{self.shard_dir} does not hold (e.g. {', '.join(unknown[:3])}): preferences of another "
                "sample run?"
            )
        pairs, ties = [], 0
        for row, (key, i, j, winner, flipped) in enumerate(
            zip(cols["key"], cols["i"], cols["j"], cols["winner"], cols["flipped"])
        ):
            if not (0 <= i < j < self.k) or winner not in (i, j, -1):
                raise UserError(
                    f"data.preferences={pfile}: row {row} (key {key}): images ({i}, {j}) winner {winner} do not "
                    f"fit groups of {self.k} images"
                )
            if winner < 0:
                ties += 1
                continue
            pairs.append((key, int(i), int(j), winner == i, bool(flipped)))
        if not pairs:
            raise UserError(
                f"data.preferences={pfile}: no decided pair ({ties} ties, which train nothing): nothing to train"
            )
        self.pairs, self.ties = pairs, ties
        log.info(
            "trajectories %s: %d decided pairs (%d ties skipped), %d of %d timesteps trained per pair",
            self.shard_dir,
            len(pairs),
            ties,
            self.T,
            self.n_steps,
        )

    def prepare(self, ctx: RunContext) -> None:
        super().prepare(ctx)
        mb = self.cfg.data.micro_batch
        self.n_batches = len(self.pairs) // (ctx.world * mb)
        if self.n_batches == 0:
            raise UserError(
                f"data.preferences: {len(self.pairs)} decided pairs are fewer than one micro-batch on every "
                f"rank ({ctx.world} rank(s) x data.micro_batch={mb}); lower data.micro_batch"
            )
        dropped = len(self.pairs) - self.n_batches * ctx.world * mb
        if dropped and ctx.rank == 0:
            log.info(
                "each epoch leaves out %d of %d pairs (a different few each epoch)", dropped, len(self.pairs)
            )
        s = self.manifest["sampler"]
        # the sampler's scheduler, rebuilt from its recorded config (set_alpha_to_one=False among it)
        self.scheduler = DDIMScheduler.from_config(s["scheduler"])
        self.scheduler.set_timesteps(self.n_steps)
        got = [int(t) for t in self.scheduler.timesteps]
        if got != [int(t) for t in s["timesteps"]]:
            raise UserError(
                f"{self.shard_dir / 'manifest.json'}: the recorded scheduler gives timesteps {got}, the "
                f"sampler recorded {s['timesteps']}"
            )
        self.uncond = torch.from_numpy(self.uncond_np).to(ctx.device).to(ctx.dtype)

    # ------------------------------------------------------------------ data position

    @property
    def epoch_micro_steps(self) -> int:
        return self.n_batches * self.T

    def position(self, micro_step: int) -> tuple[int, int, int]:
        """micro-step -> (epoch, batch within the epoch, timestep slot)."""
        e, r = divmod(micro_step, self.epoch_micro_steps)
        return e, r // self.T, r % self.T

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.data.seed, epoch]).permutation(len(self.pairs))

    def timestep_order(self, epoch: int, pair: int) -> np.ndarray:
        """The first T of a permutation of the N transition indices, for one pair in one epoch."""
        return np.random.default_rng([self.cfg.data.seed, epoch, pair, 1]).permutation(self.n_steps)[: self.T]

    def batch_pairs(self, epoch: int, batch: int, rank: int, world: int) -> list[int]:
        """Indices (into the decided pairs) of rank ``rank``'s micro-batch ``batch`` of ``epoch``."""
        mb = self.cfg.data.micro_batch
        order = self.epoch_order(epoch)
        return [int(order[(batch * mb + k) * world + rank]) for k in range(mb)]

    def _load_batch(self, epoch: int, batch: int) -> dict:
        idx = self.batch_pairs(epoch, batch, self.ctx.rank, self.ctx.world)
        lat, lps, txt, tsteps = [], [], [], []
        for p in idx:
            key, i, j, _, _ = self.pairs[p]
            where = self.index[key]
            la = read_array(where["latents"])  # [K, N+1, C, h, w] fp16
            lp = read_array(where["log_probs"])  # [K, N]
            ts = read_array(where["timesteps"])
            if la.shape[:2] != (self.k, self.n_steps + 1) or lp.shape != (self.k, self.n_steps):
                raise UserError(
                    f"{where['latents'][0]}: group {key}: latents {list(la.shape)} / log_probs {list(lp.shape)} "
                    f"do not match the manifest's {self.k} images x {self.n_steps} steps"
                )
            lat.append(la[[i, j]])
            lps.append(lp[[i, j]])
            txt.append(read_array(where["txt"]))
            tsteps.append(ts)
        return {
            "pairs": idx,
            "keys": [self.pairs[p][0] for p in idx],
            "latents": torch.from_numpy(np.stack(lat)),  # [B, 2, N+1, C, h, w]: images i, j
            "log_probs": torch.from_numpy(np.stack(lps)),  # [B, 2, N]
            "timesteps": torch.from_numpy(np.stack(tsteps)),  # [B, N]
            "txt": torch.from_numpy(np.stack(txt)),  # [B, 77, D]
            "slots": np.stack([self.timestep_order(epoch, p) for p in idx]),  # [B, T]
        }

    def batches(self, start: int):
        m = start
        while True:
            epoch, b, slot = self.position(m)
            if self._cache is None or self._cache[0] != (epoch, b):
                self._cache = ((epoch, b), self._load_batch(epoch, b))
            data = self._cache[1]
            n = torch.from_numpy(data["slots"][:, slot])  # [B] transition index of each pair
            rows = torch.arange(len(n))
            pairs = [self.pairs[p] for p in data["pairs"]]
            yield {
                "micro_step": m,
                "batch_id": (epoch, b),
                "trajectories": data,  # the whole micro-batch (Adaptive-D3PO scores every transition)
                "epoch": epoch,
                "substituted": 0,
                "keys": data["keys"],
                "x_t": data["latents"][rows, :, n],  # [B, 2, C, h, w]
                "x_prev": data["latents"][rows, :, n + 1],
                "t": data["timesteps"][rows, n],  # [B] int64
                "sampled_log_probs": data["log_probs"][rows, :, n],  # [B, 2]
                "txt": data["txt"],
                "i": torch.tensor([q[1] for q in pairs]),
                "j": torch.tensor([q[2] for q in pairs]),
                "w_first": torch.tensor([q[3] for q in pairs]),  # the winner is image i
                "flipped": torch.tensor([q[4] for q in pairs]),
                # scripted feedback has no annotators; people's labels are averaged per image upstream
                "user_id": torch.zeros(len(pairs), dtype=torch.int64),
                "true_agrees": torch.full((len(pairs),), float("nan")),
            }
            m += 1

    # ------------------------------------------------------------------ the step

    def _log_probs(self, unet, x_t, x_prev, t, text) -> torch.Tensor:
        """``t``: the timesteps on the CPU: the UNet gets a device copy, the DDIM schedule looks them up
        on the CPU (a device tensor there would cost a device -> host sync per call)."""
        t_dev = t.to(x_t.device, non_blocking=True)
        eps = cfg_noise_pred(unet, x_t.to(self.ctx.dtype), t_dev, text, self.uncond, self.guidance)
        _, lp = ddim_step_with_logprob(self.scheduler, eps, t, x_t, self.eta, prev_sample=x_prev)
        return lp

    @torch.no_grad()
    def _trajectory_sums(self, unet, data: dict) -> torch.Tensor:
        """[B, 2]: each trajectory's summed log-density of all N stored transitions under ``unet``, in
        UNet calls of the training step's size (2 B transitions)."""
        dev, dt = self.ctx.device, self.ctx.dtype
        lat = data["latents"]  # [B, 2, N+1, C, h, w]
        b, n = lat.shape[0], self.n_steps
        x_t = lat[:, :, :n].flatten(0, 2)  # [(B 2 N), C, h, w], order b, image, step
        x_prev = lat[:, :, 1:].flatten(0, 2)
        t = data["timesteps"][:, None, :].expand(b, 2, n).flatten()
        text = data["txt"][:, None, None].expand(b, 2, n, *data["txt"].shape[1:]).flatten(0, 2)
        out, size = [], 2 * b
        for k in range(0, x_t.shape[0], size):
            sl = slice(k, k + size)
            lp = self._log_probs(unet, x_t[sl].to(dev), x_prev[sl].to(dev), t[sl], text[sl].to(dev).to(dt))
            out.append(lp.float())
        return torch.cat(out).view(b, 2, n).sum(dim=2)

    def trajectory_margins(self, models: Models, batch: dict) -> torch.Tensor:
        """[M, B] Adaptive-D3PO's margins (``trajectory_margin``) under the policy and each EMA model, once
        per micro-batch: its T micro-steps lie within one optimizer step (train.grad_accum is a multiple
        of T), so no model changes between them, and the value is reused (also by a resumed run, which
        starts at an optimizer-step boundary). Every rank calls it at the same micro-steps, as the EMA
        gathers require."""
        if self._margins is not None and self._margins[0] == batch["batch_id"]:
            return self._margins[1]
        data, ema = batch["trajectories"], models.ema
        wf = batch["w_first"].to(self.ctx.device)
        ref = self._trajectory_sums(models.reference, data)
        sums = [self._trajectory_sums(models.policy, data)]
        for k in range(len(ema)):
            if k + 1 < len(ema) and ema.buffers > 1:
                ema.prefetch(k + 1)
            sums.append(self._trajectory_sums(ema.gather(k), data))
        h = torch.stack([trajectory_margin(s_, ref, wf) for s_ in sums])
        self._margins = (batch["batch_id"], h)
        return h

    def step(self, models: Models, batch: dict, micro_step: int):
        dev, dt = self.ctx.device, self.ctx.dtype
        b = batch["x_t"].shape[0]
        # one call for the pair's two images, in group order, as the sampler batched them
        x_t = batch["x_t"].to(dev).flatten(0, 1)
        x_prev = batch["x_prev"].to(dev).flatten(0, 1)
        t = batch["t"].repeat_interleave(2)  # stays on the CPU (_log_probs)
        text = batch["txt"].to(dev).to(dt).repeat_interleave(2, 0)
        pol = self._log_probs(models.policy, x_t, x_prev, t, text).view(b, 2)
        with torch.no_grad():
            ref = self._log_probs(models.reference, x_t, x_prev, t, text).view(b, 2)
        wf = batch["w_first"].to(dev)

        def wl(lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.where(wf, lp[:, 0], lp[:, 1]), torch.where(wf, lp[:, 1], lp[:, 0])

        (pw, pl), (rw, rl) = wl(pol), wl(ref)
        h_models = None
        if self.objective.ema_active and models.ema is not None:
            h_models = self.trajectory_margins(models, batch)
        out = self.objective(TransitionLogProbs(pw, rw, pl, rl, h_models=h_models))
        sampled = batch["sampled_log_probs"].to(dev)
        out.stats["sampled_gap"] = (ref - sampled).abs().amax(dim=1).detach()
        return out

    # ------------------------------------------------------------------ bookkeeping

    def pairs_per_step(self, world: int) -> int:
        """Decided pairs per optimizer step (each trained at T timesteps)."""
        return self.cfg.data.micro_batch * (self.cfg.train.grad_accum // self.T) * world

    def data_state(self) -> dict:
        return {
            "world_size": self.ctx.world,
            "micro_batch": self.cfg.data.micro_batch,
            "pairs": len(self.pairs),
            "timesteps": self.T,
        }

    def resume_position(self, state: dict) -> int:
        micro_step = state["micro_step"]
        d = state.get("data") or {}
        if d == self.data_state():
            return micro_step
        # another layout: continue at the same share of the run's pairs, at an optimizer-step boundary
        old_per_batch = d.get("world_size", 1) * d.get("micro_batch", 1)
        seen = micro_step // d.get("timesteps", self.T) * old_per_batch
        pos = seen // (self.ctx.world * self.cfg.data.micro_batch) * self.T
        pos -= pos % self.cfg.train.grad_accum
        log.warning(
            "data layout changed (%s -> %s): the pair order differs from here on; resuming at micro-step %d",
            d,
            self.data_state(),
            pos,
        )
        return pos

    def records(self, batch: dict) -> dict[str, list]:
        wf = batch["w_first"]
        return {
            "key": list(batch["keys"]),
            "winner": torch.where(wf, batch["i"], batch["j"]).tolist(),
            "loser": torch.where(wf, batch["j"], batch["i"]).tolist(),
            "timestep": batch["t"].tolist(),
            "flipped": batch["flipped"].tolist(),
        }

    def summary(self, cat: dict[str, np.ndarray]) -> dict[str, float]:
        """Implicit accuracy on the flipped and the kept preferences, when both occur; Adaptive-D3PO: the
        mean W of each and the AUROC of u for finding the flipped pairs (over the last train.auroc_window pairs)."""
        s: dict[str, float] = {}
        fl = cat["flipped"]
        if not (fl.any() and (~fl).any()):
            return s
        if "accuracy" in cat:
            s["accuracy_flipped"] = float(np.nanmean(cat["accuracy"][fl]))
            s["accuracy_clean"] = float(np.nanmean(cat["accuracy"][~fl]))
        if "u" in cat and np.isfinite(cat["u"]).all():
            s["W_flipped"], s["W_clean"] = float(cat["W"][fl].mean()), float(cat["W"][~fl].mean())
            self.window.extend(zip(cat["u"], fl))
            w = np.array(list(self.window), dtype=float)
            if len(set(w[:, 1])) == 2:
                s["auroc_u_window"] = auroc(w[:, 0], w[:, 1] > 0.5)
        return s
