"""The evaluation of ``stages.evaluate``: preference accuracy on held-out pairs, generation and reward
scores, the minority report, written as report.json, report.md (the paper's Table 3 layout: mean ±
standard error per metric per model), PNG plots and image grids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from pipeline.config import to_dict, write_resolved
from pipeline.data.flips import flipped_mask, unit_key
from pipeline.data.shards import label_agrees_with_truth, load_manifest
from pipeline.engine.context import RunContext
from pipeline.engine.precision import flush_denormals
from pipeline.errors import UserError
from pipeline.evaluate import unet_specs
from pipeline.evaluate.generate import build_pipeline, generate, grid, read_prompts
from pipeline.evaluate.minority_report import run_report
from pipeline.evaluate.preference import HeldOutDraws, implicit_margins, iter_pairs
from pipeline.evaluate.report import bar_plot, markdown_table, mean_sem
from pipeline.evaluate.scorers import build_scorers
from pipeline.evaluate.train_margins import FinalMargins
from pipeline.models import DTYPES, free_device, inspect_model, load_scheduler, load_unet, pick_device
from pipeline.schema.evaluate import EvalConfig

log = logging.getLogger("pipeline.evaluate.run")


def _correct(margin: np.ndarray, agrees: np.ndarray) -> np.ndarray:
    """Per pair: 1 if the margin prefers the winner of a label that agrees (agrees=1) / disagrees
    (agrees=0) with it, 0.5 on a tie; NaN where ``agrees`` is unknown."""
    right = (margin > 0) + 0.5 * (margin == 0)
    return np.where(np.isnan(agrees), np.nan, np.where(agrees > 0.5, right, 1.0 - right))


METRIC_LEGEND = (
    "\nHeld-out pairs (`preference.shards`), share whose implicit margin h (the model's denoising gain over "
    "the reference) prefers: `accuracy_labels` the labelled winner; `accuracy_true` the true preference "
    "(toy worlds' `true_label_0`; absent on real data); `accuracy_flipped_view` (runs with `data.flip_by` "
    "prompt or user) the labels as the run's flips would read them: the flipped prompts' or annotators' view, "
    "which the held-out pairs share with the training pairs. `base` is the reference itself: h = 0, so 0.5 by construction. "
    "Scores: mean over generated images. ± is the standard error.\n"
)


def preference_section(cfg: EvalConfig, specs, info, device, dtype, rows: dict, report: dict) -> None:
    p = cfg.preference
    manifest = load_manifest(p.shards)
    if manifest["model"]["config_hash"] != info.config_hash:
        raise UserError(f"preference.shards={p.shards} were encoded with another model than {info.path}")
    samples = list(iter_pairs(p.shards, p.max_pairs))
    truth = np.array([label_agrees_with_truth(s["meta"]) for s in samples])
    sched = load_scheduler(info)
    ctx = RunContext.local(device, dtype)
    pairs = HeldOutDraws(samples, manifest, sched, info.prediction_type, ctx, p.draws, p.batch_size, p.seed)
    # one UNet on the device at a time: the reference's errors first (kept on the CPU), then each model's
    ref = load_unet(info.path, dtype).to(device).eval()
    ref_d = pairs.d(ref)
    del ref
    free_device(device)
    sec = {"pairs": len(samples), "draws": p.draws, "models": {}}
    for spec in specs:
        unet = unet_specs.load(spec, info, dtype).to(device).eval()
        h = implicit_margins({spec.name: unet}, ref_d, pairs)[spec.name]
        labels = _correct(h, np.ones_like(h))
        entry = {"accuracy_labels": mean_sem(labels), "mean_h": float(h.mean())}
        rows[spec.name]["accuracy_labels"] = entry["accuracy_labels"]
        if np.isfinite(truth).any():
            entry["accuracy_true"] = mean_sem(_correct(h, truth))
            rows[spec.name]["accuracy_true"] = entry["accuracy_true"]
        d = (spec.run_config or {}).get("data", {})
        # the held-out pairs were never trained on: their flips say something only where the flipped
        # unit reaches them (the same prompts or annotators: did the model learn the minority's view?);
        # a pair's own random flip does not, so none is reported for flip_by=pair
        if d.get("flip_rate", 0) > 0 and d.get("flip_by", "pair") != "pair":
            units = [unit_key(s["__key__"], s["meta"], d.get("flip_by", "pair")) for s in samples]
            fl = flipped_mask(units, d.get("flip_seed", 0), d["flip_rate"])
            entry["accuracy_flipped_view"] = mean_sem(_correct(h, (~fl).astype(float)))
            entry["flipped_share"] = float(fl.mean())
            rows[spec.name]["accuracy_flipped_view"] = entry["accuracy_flipped_view"]
        sec["models"][spec.name] = entry
        del unet
        free_device(device)
    # the reference itself: h = 0 on every pair, a tie each time, so 0.5 exactly (the chance line)
    chance = {"mean": 0.5, "sem": 0.0, "n": len(samples)}
    rows["base"]["accuracy_labels"] = chance
    if np.isfinite(truth).any():
        rows["base"]["accuracy_true"] = chance
    if any("accuracy_flipped_view" in e for e in sec["models"].values()):
        rows["base"]["accuracy_flipped_view"] = chance  # against any labels: h = 0 ties every pair
    report["preference"] = sec


CPU = torch.device("cpu")


def place_scorer(scorer, device: torch.device) -> None:
    """Move a scorer's modules to ``device``, and its inputs with them (``Scorer.device``)."""
    for value in vars(scorer).values():
        if isinstance(value, torch.nn.Module):
            value.to(device)
    scorer.device = device


def generation_section(
    cfg: EvalConfig, specs, info, device, dtype, rows: dict, report: dict, out: Path
) -> None:
    """Images of every model (the base first) from the same seeds, and their scores. One UNet is on the
    device at a time, and never beside the scorers: the scorers wait on the CPU (loaded first, so a bad
    folder fails before any image is made) and come to the device to score each model's images once
    its UNet has left. SDXL in fp16 on a 16 GB V100: UNet 5.1 GB + text encoders 1.6 GB + VAE, the
    UNet's activations for ``generation.batch_size`` x 2 (guidance) latents, then one image's fp32 VAE
    decode at a time; the four scorers (~4 GB) only while no UNet is there."""
    g = cfg.generation
    prompts = read_prompts(g.prompts, g.max_prompts)
    scorers, notes = build_scorers(cfg.scorers, CPU, dtype)
    pipe = build_pipeline(info, dtype, device)
    sec = {"prompts": len(prompts), "scorer_notes": notes, "models": {}}
    grids = []
    everyone = [unet_specs.UNetSpec("base", "unet", Path(info.path) / "unet")] + list(specs)
    for i, spec in enumerate(everyone):
        unet = pipe.unet if i == 0 else unet_specs.load(spec, info, dtype)  # the base: the pipeline's own
        pipe.unet = unet.to(device).eval()
        images = generate(pipe, prompts, g.seed, g.steps, g.guidance, g.resolution, g.batch_size)
        pipe.unet = None  # none of them is needed again (a LoRA loads the base afresh)
        del unet
        free_device(device)
        folder = out / "images" / spec.name.replace(":", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(images):
            img.save(folder / f"{k:05d}.png")
        grids.append(images[: g.grid_prompts])
        entry = {}
        for sc in scorers:
            place_scorer(sc, device)
            vals = np.concatenate(
                [sc.score(images[b : b + 16], prompts[b : b + 16]) for b in range(0, len(images), 16)]
            )
            place_scorer(sc, CPU)
            entry[sc.name] = mean_sem(vals)
            rows.setdefault(spec.name, {})[sc.name] = entry[sc.name]
        free_device(device)
        sec["models"][spec.name] = entry
    names = ["base"] + [s.name for s in specs]
    grid(grids, names).save(out / "grid.png")
    sec["grid"] = str(out / "grid.png")
    report["generation"] = sec


def _final_margins(cfg: EvalConfig, rc: dict, spec, finals: dict, device, dtype) -> dict:
    """The run's final margins on its training pairs (train_margins.FinalMargins, one per base model)."""
    shards = rc["data"]["shards"]
    info = inspect_model((rc.get("model") or {}).get("path") or load_manifest(shards)["model"]["path"])
    m = cfg.minority
    fm = finals.get(str(info.path))
    if fm is None:
        fm = finals[str(info.path)] = FinalMargins(
            info, device, dtype, m.audit_draws, m.audit_batch_size, cfg.preference.seed
        )
    return fm.margins(rc, lambda: unet_specs.load(spec, info, dtype).to(device).eval())


def minority_section(cfg: EvalConfig, out: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """Per run in ``minority.runs``: the minority report, its annotator audit on every training pair's
    margin under the final policy (``minority.audit_draws`` > 0 and the run has an export)."""
    m = cfg.minority
    reports, finals = {}, {}
    for name, path in m.runs.items():
        final, why = None, None
        if m.audit_draws > 0:
            spec = (
                unet_specs.resolve(name, path, include_ema=False)[0]
                if Path(path, "export").is_dir()
                else None
            )
            rc = spec.run_config if spec is not None else None
            if rc is None or not (rc.get("data") or {}).get("shards"):
                why = "no export/ or config.yaml in the run folder: the audit reads the records' h"
            else:
                try:  # a run whose training shards are not on this machine: the records' h
                    final = _final_margins(cfg, rc, spec, finals, device, dtype)
                except UserError as e:
                    why = f"the run's training shards: {e}; the audit reads the records' h"
        reports[name] = run_report(
            path, out, name, m.bins, m.high_u_quantile, m.min_user_pairs, m.last_epochs, final=final
        )
        if why and "note" not in reports[name]:
            reports[name]["audit_note"] = why
    return reports


def run_evaluation(cfg: EvalConfig) -> int:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    specs = [
        s
        for name, path in cfg.models.unets.items()
        for s in unet_specs.resolve(name, path, cfg.models.include_ema)
    ]
    base = cfg.models.base
    if base is None and cfg.preference.shards:
        base = load_manifest(cfg.preference.shards)["model"]["path"]
    if base is None:
        base = next(
            (
                s.run_config["model"].get("path")
                for s in specs
                if s.run_config and s.run_config["model"].get("path")
            ),
            None,
        )
    if base is None and (cfg.preference.shards or cfg.generation.prompts):
        raise UserError(
            "models.base: give the starting model folder (or preference.shards, whose manifest names it)"
        )
    write_resolved(cfg, out / "config.yaml")
    report: dict = {
        "config": to_dict(cfg),
        "models": {s.name: {"kind": s.kind, "path": str(s.path)} for s in specs},
    }
    rows: dict[str, dict] = {s.name: {} for s in specs}
    device = pick_device(cfg.device)
    flush_denormals()
    dtype = DTYPES[cfg.dtype]
    if base is not None:
        info = inspect_model(base)
        if cfg.preference.shards or cfg.generation.prompts:
            rows = {"base": {}, **rows}
        if cfg.preference.shards:
            preference_section(cfg, specs, info, device, dtype, rows, report)
            free_device(device)
        if cfg.generation.prompts:
            generation_section(cfg, specs, info, device, dtype, rows, report, out)
    report["minority"] = minority_section(cfg, out, device, dtype)
    metrics = [
        "accuracy_true",
        "accuracy_labels",
        "accuracy_flipped_view",
        "pickscore",
        "hpsv2",
        "aesthetic",
        "imagereward",
    ]
    metrics = [k for k in metrics if any(k in r for r in rows.values())]
    report["table"] = rows
    md = ["# Evaluation report\n"]
    if metrics:
        md.append(markdown_table(rows, metrics))
        md.append(METRIC_LEGEND)
        plot = bar_plot(rows, metrics, out / "metrics.png", "mean ± s.e. per model")
        report["plot"] = str(plot) if plot else None
    for name, r in report["minority"].items():
        if "note" in r:
            md.append(f"\nminority ({name}): {r['note']}\n")
        elif "auroc_neg_h" in r:
            line = f"\nminority ({name}): {r['pairs']} pairs, {r['flipped']} flipped; AUROC of -h {r['auroc_neg_h']:.3f}"
            if "auroc_neg_h_final" in r:
                line += f" (under the final policy {r['auroc_neg_h_final']:.3f})"
            if "auroc_u" in r:
                line += f", AUROC of u {r['auroc_u']:.3f}"
            if "mean_W_flipped" in r:
                line += f", mean W flipped {r['mean_W_flipped']:.3f} vs clean {r['mean_W_clean']:.3f}"
            if "estimated_flip_rate" in r:
                top = ", ".join(
                    f"{u['user_id']} ({u['estimated_flip_rate']:.2f}: {u['pairs']} pairs, "
                    f"contradicts {u['policy_disagrees']:.2f})"
                    for u in r["annotators"][:5]
                )
                how = {
                    "posthoc": "fitted to the margins from training",
                    "posthoc_final": "fitted to the final policy's margins on every training pair",
                    "em_dpo": "em_dpo's own",
                }[r["flip_rate_source"]]
                line += (
                    f"; estimated flip rate {r['estimated_flip_rate']:.3f} ({how}), most distrusted annotators "
                    f"(rate shrunk toward it: pairs, share of them the policy contradicts): {top}"
                )
            elif r.get("annotators"):  # ranked by the run's own score (u or -h): whom the policy doubts
                top = ", ".join(f"{u['user_id']} ({u['policy_disagrees']:.2f})" for u in r["annotators"][:5])
                line += f"; annotators it doubts most (share of their pairs it contradicts): {top}"
            if "auroc_annotators" in r:
                line += f", AUROC over annotators {r['auroc_annotators']:.3f}"
            if "audit_note" in r:
                line += f"; {r['audit_note']}"
            md.append(line + f" ({r['plot']})\n")
    for note in report.get("generation", {}).get("scorer_notes", []):
        md.append(f"\n- {note}")
    (out / "report.md").write_text("".join(md) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    print((out / "report.md").read_text())
    print(
        f"report: {out / 'report.md'}, {out / 'report.json'}"
        + (f", {out / 'metrics.png'}" if metrics else "")
    )
    return 0
