"""`modrm eval`: score held-out pairs with one or more checkpoints; metrics.json, scores, plots, report.md.

Texts are embedded through the same cache as training (only what it lacks is encoded), so evaluating
again, or evaluating stage 0 and stage 1 on the same file, costs no encoder time the second time.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from pipeline.atomic import atomic_write, refuse_link, write_json
from pipeline.cache import ROW_COLUMNS, Cache
from pipeline.checkpoint import HEADS_FILE, METRICS_FILE, Checkpoint, load_checkpoint
from pipeline.config import Config
from pipeline.data import SPLITS, Pair, file_sha256, load_pairs
from pipeline.embed import EmbedSummary, ensure_embedded, scan_pairs
from pipeline.errors import ModrmError
from pipeline.heads import RewardHeads
from pipeline.metrics import summarize
from pipeline.pairwise import AS_GIVEN, SWAPPED, PairSet, scoring, side_rewards, split_by_group

SCORE_KEYS = ("pp", "nn", "pn", "np")  # context side, module-text side: p = positive, n = negative
PLOTS = ("score_distributions.png", "roc_curves.png", "training_curves.png")
OUTPUTS = (*PLOTS, "scores.jsonl", "config.json", "metrics.json")  # of each checkpoint's folder


# ---------------------------------------------------------------------------------------------- scoring


def score_pairs(
    model: RewardHeads, emb: np.ndarray, rows: dict[str, np.ndarray], module_idx: np.ndarray, batch_size: int = 4096
) -> dict[str, np.ndarray]:
    """Rewards of every pair as is (pp = r_pos, nn = r_neg) and with module texts swapped (pn, np), scored as
    training scores pairs (`side_rewards`): one pass of the heads per batch for all four."""
    device = next(model.parameters()).device
    pairs = PairSet(
        torch.from_numpy(np.stack([rows[c] for c in ROW_COLUMNS], axis=1).astype(np.int64)),
        torch.from_numpy(np.asarray(module_idx, dtype=np.int64)),
    )

    def lookup(index: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(emb[index.numpy()], dtype=np.float32)).to(device)

    out = {key: np.empty(len(pairs), dtype=np.float32) for key in SCORE_KEYS}
    with scoring(model):
        for lo in range(0, len(pairs), batch_size):
            rewards = side_rewards(model, pairs[lo : lo + batch_size], lookup, lookup, (*AS_GIVEN, *SWAPPED))
            for key, values in zip(SCORE_KEYS, rewards, strict=True):
                out[key][lo : lo + batch_size] = values.float().cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------- checks


def resolve_split(ckpt: Checkpoint, data: Path, split: str) -> tuple[str, str]:
    """(the split to score, why). `auto`: a file the checkpoint trained on is scored on its test split only (the
    pairs it trained or validated on are left out); a file it never saw is scored whole."""
    if split != "auto":
        return split, f"--split {split}"
    digest = file_sha256(data)
    seen = next((t["path"] for t in ckpt.trained_on if t["sha256"] == digest), None)
    if seen is not None:
        return "test", f"the checkpoint trained on this file (as {seen}): its train and val pairs are left out"
    return "all", "the checkpoint never trained on this file: every pair is scored"


def select_split(pairs: Sequence[Pair], split: str, config: Config, data: Path) -> list[Pair]:
    """The pairs of one split, by split key with the checkpoint's own split settings, as training splits them (so
    test stays unseen)."""
    if split == "all":
        return list(pairs)
    split_of = split_by_group((p.split_key for p in pairs), config.data)
    chosen = [p for p in pairs if split_of[p.split_key] == split]
    if not chosen:
        raise ModrmError(f"{data}: no pair falls in the {split} split (by task); use --split all")
    return chosen


def cache_folder(ckpt: Checkpoint, cache: Path | None) -> Path:
    """--cache, else the checkpoint's own: stage 1 keeps one beside its encoder, stage 0 reuses its training cache."""
    if cache is not None:
        return Path(cache)
    if ckpt.stage == 1:
        return ckpt.folder / "cache"
    if ckpt.cache is None:
        raise ModrmError(f"checkpoint {ckpt.folder}: records no embedding cache; pass --cache DIR")
    return Path(ckpt.cache)


def labels_for(ckpts: Sequence[Checkpoint]) -> list[str]:
    """stageN, with the folder name added where two checkpoints share a stage (and an index if still equal)."""
    labels = [f"stage{c.stage}" for c in ckpts]
    counts = Counter(labels)
    labels = [f"{lab}-{c.folder.name}" if counts[lab] > 1 else lab for lab, c in zip(labels, ckpts, strict=True)]
    counts = Counter(labels)
    return [f"{lab}-{i}" if counts[lab] > 1 else lab for i, lab in enumerate(labels)]


# ---------------------------------------------------------------------------------------------- outputs


def check_out(out: Path, folders: Sequence[Path]) -> None:
    """Before any scoring: --out must be a folder (or nothing yet), never a checkpoint (eval's config.json and
    metrics.json would replace the checkpoint's), and nothing eval writes in it may be a symbolic link (--out
    itself may: the user named it)."""
    if out.exists() and not out.is_dir():
        raise ModrmError(f"--out {out}: is a file; name a folder for metrics.json, report.md and plots")
    for folder in folders:
        if folder != out:
            refuse_link(folder)
        if (folder / HEADS_FILE).exists():
            raise ModrmError(f"--out {folder}: is a checkpoint folder, whose files eval would replace; name another")
        for name in OUTPUTS:
            refuse_link(folder / name)
    refuse_link(out / "report.md")


def write_scores(path: Path, pairs: Sequence[Pair], scores: dict[str, np.ndarray]) -> None:
    records = (
        {
            "pair_id": p.pair_id,
            "target_module": p.target_module,
            "r_pos": float(scores["pp"][i]),
            "r_neg": float(scores["nn"][i]),
            "r_pos_ctx_neg_mod": float(scores["pn"][i]),
            "r_neg_ctx_pos_mod": float(scores["np"][i]),
        }
        for i, p in enumerate(pairs)
    )
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _save(fig: Figure, path: Path) -> None:
    """A bare Figure renders through Agg without pyplot's global state (safe off the main thread)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_distributions(path: Path, groups: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """One histogram panel per module: positive vs negative rewards on shared bins."""
    ncols = min(2, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.5 * nrows))  # fixed spacing: a layout engine triples the render time
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.1, top=0.92, hspace=0.45, wspace=0.25)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, (r_pos, r_neg)) in zip(axes, groups.items(), strict=False):
        bins = np.histogram_bin_edges(np.concatenate([r_pos, r_neg]), bins=30)
        for values, side, color in ((r_pos, "positive", "tab:green"), (r_neg, "negative", "tab:red")):
            ax.hist(values, bins=bins, alpha=0.5, label=side, color=color, histtype="stepfilled")
        ax.set(title=f"{name} ({len(r_pos)} pairs)", xlabel="reward", ylabel="pairs")
        ax.legend()
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    _save(fig, path)


def plot_roc(path: Path, groups: dict[str, tuple[np.ndarray, np.ndarray]], aucs: dict[str, float | None]) -> None:
    """One ROC curve per module (positives labelled 1, negatives 0); no pooled curve: the heads' scales differ."""
    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    for name, (r_pos, r_neg) in groups.items():
        labels = np.concatenate([np.ones(len(r_pos)), np.zeros(len(r_neg))])
        fpr, tpr, _ = roc_curve(labels, np.concatenate([r_pos, r_neg]))
        ax.plot(fpr, tpr, label=f"{name} (AUC {_fmt(aucs[name])})", linewidth=1.5)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    title = f"ROC per module; overall AUC (their mean) {_fmt(aucs.get('overall'))}"
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    _save(fig, path)


Curves = dict[str, tuple[list[float], list[float]]]


def training_curves(ckpt: Checkpoint) -> Curves:
    """What the checkpoint's training wrote: stage 0 one point per epoch (metrics.jsonl), stage 1 one training
    point per optimizer step and one validation point per epoch (epoch 0: its stage-0 start), on one x axis
    in epochs. Only the plot needs them, so a damaged log is left out with a warning naming it."""
    path = ckpt.folder / ("metrics.jsonl" if ckpt.stage == 0 else METRICS_FILE)
    try:
        return _epoch_curves(path) if ckpt.stage == 0 else _step_curves(path)
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as err:
        print(f"warning: {path} is damaged ({err!s:.200}); the training-curves plot leaves it out", file=sys.stderr)
        return {}


def _epoch_curves(path: Path) -> Curves:
    """Stage 0's metrics.jsonl (absent: no curves)."""
    log = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    epochs = [float(r["epoch"]) for r in log]
    return {
        "train loss": (epochs, [float(r["train_loss"]) for r in log]),
        "val loss": (epochs, [float(r["val_loss"]) for r in log]),
    }


def _step_curves(path: Path) -> Curves:
    """Stage 1's metrics.json: its optimizer steps and its epochs' validation."""
    metrics = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(metrics, dict):
        raise ValueError(f"a JSON {type(metrics).__name__}, not an object")
    steps = [(float(s["epoch"]), float(s["loss"])) for s in metrics.get("steps", [])]
    history = [(float(h["epoch"]), float(h["val_loss"])) for h in metrics.get("history", [])]
    per_epoch = Counter(epoch for epoch, _ in steps)
    seen: Counter = Counter()
    x = []
    for epoch, _ in steps:  # step k of an epoch of n steps sits at epoch - 1 + k / n
        seen[epoch] += 1
        x.append(epoch - 1 + seen[epoch] / per_epoch[epoch])
    return {
        "train loss": (x, [loss for _, loss in steps]),
        "val loss": ([epoch for epoch, _ in history], [val for _, val in history]),
    }


def plot_training(path: Path, curves: Curves, stage: int) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o" if name == "val loss" else None, markersize=4, label=name, linewidth=1.2)
    ax.set(xlabel="epoch", ylabel="loss", title=f"stage {stage} training")
    if curves:
        ax.legend()
    _save(fig, path)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def module_table(metrics: dict) -> str:
    """One row per module, then overall."""
    lines = [
        "| module | n_pairs | accuracy | 95% CI | AUC | separation | swap accuracy | length corr. |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    rows = [*metrics["modules"].items(), ("**overall**", metrics["overall"])]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['n_pairs']} | {_fmt(m['accuracy'])} | {_ci(m['accuracy_ci95'])} | {_fmt(m['auc'])} | "
            f"{_fmt(m['separation'], signed=True)} | {_fmt(m.get('swap_accuracy'))} | "
            f"{_fmt(m['length_correlation'], signed=True)} |"
        )
    return "\n".join(lines)


def comparison_table(results: dict[str, dict]) -> str:
    """Accuracy and AUC side by side, one column group per checkpoint, so stages compare at a glance."""
    labels = list(results)
    modules = list(dict.fromkeys(m for metrics in results.values() for m in metrics["modules"]))
    header = "| module | " + " | ".join(f"{lab} accuracy | {lab} AUC" for lab in labels) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(labels)]
    for name in [*modules, "overall"]:
        cells = []
        for metrics in results.values():
            m = metrics["overall"] if name == "overall" else metrics["modules"].get(name)
            cells += [_fmt(m["accuracy"]), _fmt(m["auc"])] if m else ["n/a", "n/a"]
        shown = "**overall**" if name == "overall" else name
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(results: dict[str, dict]) -> str:
    """The markdown tables: one per checkpoint, then the side-by-side comparison when there are several."""
    parts = [f"### {label} ({m['n_pairs']} pairs)\n\n{module_table(m)}" for label, m in results.items()]
    if len(results) > 1:
        parts.append(f"### comparison\n\n{comparison_table(results)}")
    return "\n\n".join(parts)


def write_report(out: Path, results: dict[str, dict], folders: dict[str, Path], data: Path, split: str) -> None:
    lines = [f"# modrm evaluation\n\ndata: `{data}`  --split {split}\n"]
    lines += [
        f"- {label}: checkpoint `{m['checkpoint']}`; scored {m['n_pairs']} pairs, split {m['split']}: "
        f"{m['split_reason']}"
        for label, m in results.items()
    ]
    lines += ["", "Overall AUC is the mean of the modules' AUCs (each head's reward has its own offset); the length"]
    lines += ["correlation is within pairs: reward gap against module-text length gap.", ""]
    lines += ["", format_table(results), "", "## plots", ""]
    for label, folder in folders.items():
        for plot in PLOTS:
            rel = (folder / plot).relative_to(out).as_posix()
            lines.append(f"- {label}: [{rel}]({rel})")
    text = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------------------------------- evaluate


@dataclass
class Scored:
    """A checkpoint's rewards for pairs, with what the metrics need beside them."""

    scores: dict[str, np.ndarray]  # SCORE_KEYS -> rewards
    module_idx: np.ndarray
    lengths_pos: np.ndarray  # module-text tokens of each side
    lengths_neg: np.ndarray
    cache: Path
    embed: EmbedSummary


def score_checkpoint(ckpt: Checkpoint, pairs: Sequence[Pair], cache: Path | None, progress: bool) -> Scored:
    """Embed what the cache lacks (never `write_pairs`: that index belongs to training), then score."""
    info = ckpt.encoder_info()
    summary, store_at = EmbedSummary(n_pairs=len(pairs)), cache_folder(ckpt, cache)
    with tempfile.TemporaryDirectory(prefix="modrm-eval-") as work, Cache.open(store_at, info.fingerprint) as store:
        scan = scan_pairs(pairs, ckpt.config, Path(work))
        plan = ensure_embedded(scan, store, info, summary, progress)
        store.commit(plan.order)
    placed = plan.rows
    rows = {column: placed[:, k] for k, column in enumerate(ROW_COLUMNS)}
    lookup = {name: i for i, name in enumerate(ckpt.model.module_names)}
    module_idx = np.array([lookup[p.target_module] for p in pairs], dtype=np.int64)
    emb = store.embeddings(ckpt.config.train.memory_budget_gb * 2**30)
    store.check_finite(emb[np.unique(placed)])
    scores = score_pairs(ckpt.model, emb, rows, module_idx)
    lengths = store.text_columns(np.concatenate([rows["pos_mod_row"], rows["neg_mod_row"]]), ["n_tokens"])
    pos_tokens, neg_tokens = np.split(lengths["n_tokens"], 2)
    return Scored(scores, module_idx, pos_tokens, neg_tokens, store.folder, summary)


def write_outputs(folder: Path, ckpt: Checkpoint, pairs: Sequence[Pair], scored: Scored, metrics: dict) -> None:
    """metrics.json (last, so its presence means the folder is complete), scores, plots, resolved config."""
    pp, nn = scored.scores["pp"], scored.scores["nn"]
    groups = {
        m: (pp[scored.module_idx == i], nn[scored.module_idx == i]) for i, m in enumerate(ckpt.model.module_names)
    }
    groups = {m: g for m, g in groups.items() if m in metrics["modules"]}
    plot_distributions(folder / PLOTS[0], groups)
    aucs = {m: metrics["modules"][m]["auc"] for m in groups} | {"overall": metrics["overall"]["auc"]}
    plot_roc(folder / PLOTS[1], groups, aucs)
    plot_training(folder / PLOTS[2], training_curves(ckpt), ckpt.stage)
    write_scores(folder / "scores.jsonl", pairs, scored.scores)
    write_json(folder / "config.json", ckpt.config.to_dict())
    write_json(folder / "metrics.json", metrics)


def evaluate_checkpoint(
    ckpt: Checkpoint, pairs: Sequence[Pair], data: Path, folder: Path, cache: Path | None, split: str, progress: bool
) -> dict:
    """Score one checkpoint's split of the pairs and write its metrics, scores and plots to `folder`."""
    ckpt.check_modules(pairs, data)
    split, reason = resolve_split(ckpt, data, split)
    chosen = select_split(pairs, split, ckpt.config, data)
    scored = score_checkpoint(ckpt, chosen, cache, progress)
    s = scored.scores
    metrics = summarize(
        ckpt.model.module_names, scored.module_idx, s["pp"], s["nn"], s, scored.lengths_pos, scored.lengths_neg
    )
    metrics |= {
        "checkpoint": str(ckpt.folder),
        "stage": ckpt.stage,
        "data": str(data),
        "split": split,
        "split_reason": reason,
        "cache": str(scored.cache),
        "embed": {"cached": scored.embed.cached, "encoded": scored.embed.encoded},
    }
    write_outputs(folder, ckpt, chosen, scored, metrics)
    return metrics


def evaluate(
    checkpoint_dirs: Sequence[Path],
    data: Path,
    out: Path,
    cache: Path | None = None,
    split: str = "auto",
    progress: bool = True,
    device: str = "auto",
    trust_remote_code: bool = False,
) -> dict[str, dict]:
    """Evaluate each checkpoint on the pairs in `data`; returns {label: metrics}, writes out/report.md.

    One checkpoint writes straight into `out`; several write into out/<label>/ and the report compares them.
    `trust_remote_code`: let the encoder folders' own Python files run (a saved config never does).
    """
    if split not in ("auto", "all", *SPLITS):
        raise ModrmError(f"split {split!r}: use auto, all, {', '.join(SPLITS)}")
    if not checkpoint_dirs:
        raise ModrmError("eval: give at least one --checkpoint")
    data, out = Path(data), Path(out)
    pairs = load_pairs([data], modules=[])
    ckpts = [load_checkpoint(d, trust_remote_code=trust_remote_code) for d in checkpoint_dirs]
    for ckpt in ckpts:
        ckpt.run_on(device)
    labels = labels_for(ckpts)
    folders = {label: out if len(ckpts) == 1 else out / label for label in labels}
    check_out(out, list(folders.values()))
    results = {
        label: evaluate_checkpoint(ckpt, pairs, data, folders[label], cache, split, progress)
        for label, ckpt in zip(labels, ckpts, strict=True)
    }
    write_report(out, results, folders, data, split)
    return results
