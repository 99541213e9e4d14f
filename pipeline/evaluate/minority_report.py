"""Minority detection from a run's per-pair records: does the minority score u rank the flipped pairs
high (the paper's Figure 3), and which annotators does it single out (per-annotator audit)?"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.losses.noise_model import fit_flip_rates
from pipeline.metrics_log import read_pair_records
from pipeline.minority import auroc, flipped_share_by_bin


def latest_per_pair(table, last_epochs: int = 1) -> dict[str, np.ndarray]:
    """Each pair's most recent record (within the last ``last_epochs`` passes over it)."""
    cols = {c: np.asarray(table[c].to_pylist(), dtype=object) for c in table.column_names}
    steps = cols["step"].astype(int)
    keys = cols["key"]
    order = np.argsort(steps, kind="stable")
    seen: dict[str, list[int]] = {}
    for i in order:
        seen.setdefault(keys[i], []).append(int(i))
    pick = [idx[-1] for idx in seen.values()]
    if last_epochs > 1:
        pick = [j for idx in seen.values() for j in idx[-last_epochs:]]
    out = {}
    for c, v in cols.items():
        arr = v[pick]
        out[c] = arr.astype(float) if c not in ("key",) else arr
    out["flipped"] = out["flipped"].astype(bool)
    return out


def rank_annotators(
    users: np.ndarray,
    score: np.ndarray,
    high_q: float,
    min_pairs: int,
    extra: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    """Per annotator: pairs, mean score, share of their pairs above the ``high_q`` quantile of the score
    over everyone, and the mean of each ``extra`` column (same length as ``users``). The annotators
    furthest from the consensus (highest share, then highest mean) come first; those with fewer than
    ``min_pairs`` pairs come last. ``score`` is any per-pair "disagrees with the rest" measure: here
    a trained run's u or -h, in the labelling service the raw labels' disagreement with the majority."""
    thr = float(np.nanquantile(score, high_q))
    rows = []
    for u in np.unique(users):
        m = users == u
        s = score[m]
        row = {
            "user_id": int(u),
            "pairs": int(m.sum()),
            "mean_score": float(np.nanmean(s)),
            "high_share": float(np.mean(s > thr)),
        }
        row.update({k: float(np.mean(v[m])) for k, v in (extra or {}).items()})
        rows.append(row)
    rows.sort(key=lambda r: (r["pairs"] < min_pairs, -r["high_share"], -r["mean_score"]))
    return rows


def per_annotator(rec: dict[str, np.ndarray], high_q: float, min_pairs: int) -> list[dict]:
    if "h" not in rec:
        return []  # an objective without a preference margin (SFT)
    score = rec["u"] if "u" in rec and np.isfinite(rec["u"]).any() else -rec["h"]
    extra = {
        "policy_disagrees": rec["h"] < 0,  # the model prefers the other image
        "flipped_share": rec["flipped"],
    }
    return rank_annotators(rec["user_id"].astype(int), score, high_q, min_pairs, extra)


def objective_state(run_dir: str | Path) -> dict:
    """The objective's state tensors in the run's latest checkpoint ({} when it keeps none)."""
    from safetensors.torch import load_file

    root = Path(run_dir) / "checkpoints"
    latest = root / "latest"
    f = root / latest.read_text().strip() / "objective.safetensors" if latest.is_file() else None
    return load_file(str(f)) if f is not None and f.is_file() else {}


def estimated_flip_rates(run_dir: str | Path) -> tuple[float, dict[int, float]] | None:
    """em_dpo's final estimates from the run's latest checkpoint: (global rate, {user_id: rate});
    None for an objective that keeps none."""
    state = objective_state(run_dir)
    if "user_rate" not in state or "scalars" not in state:
        return None
    return float(state["scalars"][0]), dict(zip(state["users"].tolist(), state["user_rate"].tolist()))


def posthoc_flip_rates(
    run_dir: str | Path, rec: dict[str, np.ndarray], prior_pairs: float = 4.0
) -> tuple[float, dict[int, float]] | None:
    """For an objective that estimates no rates: the label-flip model (noise_model.fit_flip_rates)
    fitted to the run's per-pair margins, logits beta h with the run's objective.beta; each annotator's
    rate shrunk toward the global one with the weight of ``prior_pairs`` pairs. None without a beta
    (no config.yaml) or a margin."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    beta = ((yaml.safe_load(p.read_text()) or {}).get("objective") or {}).get("beta") if p.is_file() else None
    if not beta or "h" not in rec:
        return None
    fit = fit_flip_rates(float(beta) * rec["h"], rec["user_id"].astype(int), prior_pairs=prior_pairs)
    return fit["rate"], dict(zip(fit["users"].tolist(), fit["user_rate"].tolist()))


def write_margins(final: dict[str, np.ndarray], path: Path) -> Path:
    """The final policy's margin per training pair (key, user_id, flipped, true_agrees, h), for a
    reader's own analysis; written under a temporary name, then renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "key": [str(k) for k in final["key"]],
        "user_id": final["user_id"].astype(np.int64),
        "flipped": final["flipped"].astype(bool),
        "true_agrees": final["true_agrees"].astype(np.float64),
        "h": final["h"].astype(np.float64),
    }
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(path)
    return path


def _flip_unit(run_dir: str | Path) -> str | None:
    """The run's ``data.flip_by`` (its resolved config.yaml), None when it flipped nothing or is unknown."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        return None
    data = (yaml.safe_load(p.read_text()) or {}).get("data", {})
    return data.get("flip_by") if data.get("flip_rate", 0) > 0 else None


def run_report(
    run_dir: str | Path,
    out: Path,
    name: str,
    bins: int,
    high_q: float,
    min_pairs: int,
    last_epochs: int,
    final: dict[str, np.ndarray] | None = None,
) -> dict:
    """The run's minority report from its per-pair records. ``final`` (train_margins.FinalMargins):
    every training pair's h under the final policy; the annotator audit (ranking, flip rates, AUROC
    over annotators) then reads it instead of the records' h from the step that trained each pair."""
    table = read_pair_records(run_dir)
    if table is None:
        return {"run": str(run_dir), "note": "no per-pair records (output.pair_records=false?)"}
    rec = latest_per_pair(table, last_epochs)
    if "h" not in rec:
        return {
            "run": str(run_dir),
            "note": "this objective has no preference margin h (SFT): nothing to rank",
        }
    has_u = "u" in rec and np.isfinite(rec["u"]).any()
    flipped = rec["flipped"]
    res: dict = {
        "run": str(run_dir),
        "pairs": int(len(flipped)),
        "flipped": int(flipped.sum()),
        "score": "u" if has_u else "-h",
    }
    if has_u:
        ok = np.isfinite(rec["u"])
        res["auroc_u"] = auroc(rec["u"][ok], flipped[ok])
        res["flipped_share_by_u_bin"] = flipped_share_by_bin(rec["u"][ok], flipped[ok], bins)
        if "W" in rec:  # em_dpo logs u (the posterior of a flip) but weighs no pair
            res["mean_W_flipped"] = float(np.nanmean(rec["W"][flipped])) if flipped.any() else math.nan
            res["mean_W_clean"] = float(np.nanmean(rec["W"][~flipped]))
    res["auroc_neg_h"] = auroc(-rec["h"], flipped)
    if final is not None:  # the audit reads the final policy's verdict on every training pair
        res["audit_margins"] = "final"
        res["auroc_neg_h_final"] = auroc(-final["h"], final["flipped"])
        res["audit_pairs_file"] = str(write_margins(final, Path(out) / f"audit_{name}.parquet"))
        users = per_annotator(final, high_q, min_pairs)
        rates, res["flip_rate_source"] = posthoc_flip_rates(run_dir, final), "posthoc_final"
    else:
        res["audit_margins"] = "records"
        users = per_annotator(rec, high_q, min_pairs)
        rates, res["flip_rate_source"] = estimated_flip_rates(run_dir), "em_dpo"
        if rates is None:  # any other objective: the same model fitted to its margins after training
            rates, res["flip_rate_source"] = posthoc_flip_rates(run_dir, rec), "posthoc"
    key = "mean_score"
    if rates is None:
        del res["flip_rate_source"]
    else:  # each annotator's rate, shrunk toward the global one, ranks them
        res["estimated_flip_rate"], per_user = rates
        for u in users:
            u["estimated_flip_rate"] = per_user.get(u["user_id"], res["estimated_flip_rate"])
        users.sort(key=lambda u: (u["pairs"] < min_pairs, -u["estimated_flip_rate"]))
        key = "estimated_flip_rate"
    res["annotators"] = users
    flipped_users = np.array([u["flipped_share"] > 0.5 for u in users])
    # only where whole annotators were flipped: with pair-level flips an annotator's flipped share is
    # chance, and an AUROC over annotators would rank noise
    if _flip_unit(run_dir) == "user" and flipped_users.any() and (~flipped_users).any():
        res["auroc_annotators"] = auroc([u[key] for u in users], flipped_users)
    res["plot"] = str(_plot(rec, res, out / f"minority_{name}.png", name, bins) or "")
    return res


def _plot(rec, res, path: Path, name: str, bins: int) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = rec["u"] if res["score"] == "u" else -rec["h"]
    ok = np.isfinite(score)
    fl = rec["flipped"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    if fl.any():
        shares = flipped_share_by_bin(score[ok], fl[ok], bins)
        a.bar(range(len(shares)), [x["flipped_share"] for x in shares], color="tab:red")
        a.axhline(fl.mean(), color="gray", ls="--", lw=0.8, label=f"overall {fl.mean():.2f}")
        a.set_xlabel(f"{res['score']} bin (equal counts, low -> high)")
        a.set_ylabel("flipped share")
        a.legend(fontsize=8)
        key = "auroc_u" if res["score"] == "u" else "auroc_neg_h"
        a.set_title(f"{name}: flipped share per {res['score']} bin (AUROC {res[key]:.3f})", fontsize=9)
    # u spans orders of magnitude: show log10(u); -h is shown as is
    if res["score"] == "u":
        pos = ok & (score > 0)
        floor = score[pos].min() / 10 if pos.any() else 1e-12  # a decade below the smallest u > 0
        # u == 0 only: a bar at this floor = pairs with s = 0 (all M models gave the same h) or c under float32 (g > ~100)
        x, xlabel = np.log10(np.where(score > 0, score, floor)), "log10 u"
    else:
        x, xlabel = score, "-h"
    edges = np.histogram_bin_edges(x[ok], bins=40)
    if fl.any():
        b.hist(x[ok & ~fl], bins=edges, alpha=0.6, label="clean", density=True)
        b.hist(x[ok & fl], bins=edges, alpha=0.6, label="flipped", density=True)
        b.legend(fontsize=8)
    else:
        a.text(0.5, 0.5, "no flipped labels in this run", ha="center")
        b.hist(x[ok], bins=edges)
    b.set_xlabel(xlabel)
    b.set_title(f"distribution of {res['score']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
