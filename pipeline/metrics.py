"""Pairwise reward metrics (numpy): accuracy, AUC, separation, bootstrap CI, reward-hacking checks.

Every function takes rewards of the positive (r_pos) and negative (r_neg) side of the same pairs, so a
pair's two rewards always line up by index. A tie counts half, by the tie rule training uses too
(`pipeline.pairwise.wins`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from pipeline.pairwise import wins


def _floats(*rewards: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(r, dtype=np.float64) for r in rewards]


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def pairwise_metrics(r_pos: np.ndarray, r_neg: np.ndarray) -> dict:
    """Accuracy (ties count half), AUC over all rewards (positives labelled 1), mean reward gap."""
    r_pos, r_neg = _floats(r_pos, r_neg)
    n = len(r_pos)
    auc = None
    if n:
        labels = np.concatenate([np.ones(n), np.zeros(n)])
        auc = float(roc_auc_score(labels, np.concatenate([r_pos, r_neg])))
    return {
        "n_pairs": n,
        "accuracy": _mean(wins(r_pos, r_neg)),
        "auc": auc,
        "separation": _mean(r_pos - r_neg),
        "mean_pos": _mean(r_pos),
        "mean_neg": _mean(r_neg),
    }


def bootstrap_ci(r_pos: np.ndarray, r_neg: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> list[float] | None:
    """95% percentile interval of pairwise accuracy over pairs resampled with replacement.

    A pair only ever contributes 0, 0.5 or 1, so a resample's accuracy depends only on how many of each it
    drew: one multinomial draw [n_resamples, 3] has exactly the distribution of resampling n indices, without
    the [n_resamples, n] index matrix (800 MB for 100k pairs).
    """
    won = wins(*_floats(r_pos, r_neg))
    n = len(won)
    if not n:
        return None
    values = np.array([0.0, 0.5, 1.0])
    probs = np.array([(won == v).mean() for v in values])
    counts = np.random.default_rng(seed).multinomial(n, probs, size=n_resamples)
    accuracies = counts @ values / n
    lo, hi = np.percentile(accuracies, [2.5, 97.5])
    return [float(lo), float(hi)]


def length_correlation(
    r_pos: np.ndarray, r_neg: np.ndarray, lengths_pos: np.ndarray, lengths_neg: np.ndarray
) -> float | None:
    """Within pairs: Spearman correlation of the reward gap (r+ - r-) with the module texts' length gap in
    tokens. Near 1 means the reward follows length, not content. Measured within pairs, so a correct reward is
    not flagged when the worse texts merely happen to be shorter. None when undefined (under 3 pairs, or a
    constant gap)."""
    gaps = np.asarray(r_pos, dtype=np.float64) - np.asarray(r_neg, dtype=np.float64)
    length_gaps = np.asarray(lengths_pos, dtype=np.float64) - np.asarray(lengths_neg, dtype=np.float64)
    if len(gaps) < 3 or np.ptp(gaps) == 0 or np.ptp(length_gaps) == 0:
        return None
    rho = spearmanr(gaps, length_gaps).statistic
    return float(rho) if np.isfinite(rho) else None


def swap_check(r_pp: np.ndarray, r_pn: np.ndarray, r_np: np.ndarray, r_nn: np.ndarray) -> dict:
    """With the context held fixed, does the positive module text still win? r_xy: context x, module text y.

    A head that only reads the context (which differs between the sides) scores well on accuracy yet ~0.5
    here: the module text is what a module-level reward must judge.
    """
    r_pp, r_pn, r_np, r_nn = _floats(r_pp, r_pn, r_np, r_nn)
    pos_ctx, neg_ctx = _mean(wins(r_pp, r_pn)), _mean(wins(r_np, r_nn))
    both = None if pos_ctx is None else (pos_ctx + neg_ctx) / 2
    return {"accuracy_pos_context": pos_ctx, "accuracy_neg_context": neg_ctx, "swap_accuracy": both}


def _group_metrics(
    r_pos: np.ndarray,
    r_neg: np.ndarray,
    swap: dict[str, np.ndarray] | None,
    lengths_pos: np.ndarray,
    lengths_neg: np.ndarray,
    seed: int = 0,
) -> dict:
    """Every metric for one group of pairs (a module, or all of them)."""
    out = pairwise_metrics(r_pos, r_neg)
    out["accuracy_ci95"] = bootstrap_ci(r_pos, r_neg, seed=seed)
    out["length_correlation"] = length_correlation(r_pos, r_neg, lengths_pos, lengths_neg)
    if swap is not None:
        out |= swap_check(r_pos, swap["pn"], swap["np"], r_neg)
    return out


def summarize(
    module_names: Sequence[str],
    pair_module: np.ndarray,
    r_pos: np.ndarray,
    r_neg: np.ndarray,
    swap: dict[str, np.ndarray] | None,
    lengths_pos: np.ndarray,
    lengths_neg: np.ndarray,
    seed: int = 0,
) -> dict:
    """metrics.json (the README's Evaluation section): overall and per module; modules without pairs are left out.

    `swap` holds "pn" (positive context, negative module text) and "np" (the reverse), as `score_pairs` returns.
    """
    pair_module = np.asarray(pair_module)

    def group(mask: np.ndarray) -> dict:
        sub_swap = None if swap is None else {k: np.asarray(swap[k])[mask] for k in ("pn", "np")}
        return _group_metrics(
            np.asarray(r_pos)[mask],
            np.asarray(r_neg)[mask],
            sub_swap,
            np.asarray(lengths_pos)[mask],
            np.asarray(lengths_neg)[mask],
            seed,
        )

    modules = {}
    for index, name in enumerate(module_names):
        mask = pair_module == index
        if mask.any():
            modules[name] = group(mask)
    overall = group(np.ones(len(pair_module), dtype=bool))
    # The heads' offsets are arbitrary (Bradley-Terry is shift-invariant), so pooling four heads' rewards into
    # one ROC mixes scales: the overall AUC is the mean of the modules' AUCs.
    aucs = [m["auc"] for m in modules.values() if m["auc"] is not None]
    overall["auc"] = float(np.mean(aucs)) if aucs else None
    return {"n_pairs": len(pair_module), "overall": overall, "modules": modules}
