"""Eval: metrics against scikit-learn, batched scoring against the model row by row, and `evaluate` end to end
on a randomly initialised checkpoint over a tiny cache (quality is meaningless; the plumbing is not)."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.cache import ROW_COLUMNS
from pipeline.checkpoint import HEADS_FILE, load_checkpoint, save_heads
from pipeline.config import HeadConfig
from pipeline.data import DEFAULT_MODULES, assign_split
from pipeline.embed import embed_files
from pipeline.encoder import describe
from pipeline.errors import ModrmError
from pipeline.evaluate import evaluate, format_table, labels_for, score_pairs
from pipeline.heads import RewardHeads
from pipeline.metrics import bootstrap_ci, length_correlation, pairwise_metrics, summarize, swap_check

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC_KEYS = {"n_pairs", "accuracy", "auc", "separation", "accuracy_ci95", "length_correlation", "swap_accuracy"}
REVISED = " (revised for eval)"
SMALL_HEADS = HeadConfig(hidden=32, hidden2=16, dropout=0.0)

# ---------------------------------------------------------------------------------------------- metrics


def test_pairwise_metrics_match_sklearn_and_count_ties_half():
    r_pos = np.array([0.9, 0.2, 0.5, 0.7, 0.1])
    r_neg = np.array([0.1, 0.4, 0.5, 0.3, 0.6])
    m = pairwise_metrics(r_pos, r_neg)
    labels = np.r_[np.ones(5), np.zeros(5)]
    assert m["auc"] == pytest.approx(roc_auc_score(labels, np.r_[r_pos, r_neg]))
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1 + 0) / 5)
    assert m["separation"] == pytest.approx(np.mean(r_pos - r_neg))
    assert (m["n_pairs"], m["mean_pos"], m["mean_neg"]) == (5, pytest.approx(0.48), pytest.approx(0.38))
    assert pairwise_metrics(np.array([]), np.array([]))["auc"] is None


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    r_pos, r_neg = rng.normal(0.5, 1, 200), rng.normal(0, 1, 200)
    accuracy = pairwise_metrics(r_pos, r_neg)["accuracy"]
    lo, hi = bootstrap_ci(r_pos, r_neg, seed=3)
    assert lo <= accuracy <= hi and hi - lo < 0.25
    assert bootstrap_ci(r_pos, r_neg, seed=3) == [lo, hi]
    assert bootstrap_ci(np.ones(4), np.zeros(4)) == [1.0, 1.0]


def test_length_correlation_is_measured_within_pairs():
    len_pos, len_neg = np.array([60, 90, 70, 80, 65, 95]), np.array([50, 40, 60, 20, 55, 30])
    gap = (len_pos - len_neg).astype(float)
    assert length_correlation(np.log(gap) * 2 + 1, np.zeros(6), len_pos, len_neg) == pytest.approx(1.0)
    assert length_correlation(-gap, np.zeros(6), len_pos, len_neg) == pytest.approx(-1.0)
    # a correct reward whose gap does not follow the length gap is not flagged, though every worse text is
    # shorter (pooling both sides would correlate reward with length strongly here)
    r_pos, r_neg = np.array([2.0, 2.1, 1.9, 2.0, 2.05, 1.95]), np.array([0.1, 0.0, 0.2, 0.15, 0.05, 0.1])
    assert abs(length_correlation(r_pos, r_neg, len_pos, len_neg)) < 0.5
    assert length_correlation(np.ones(6), np.zeros(6), len_pos, len_neg) is None
    assert length_correlation(np.array([1.0, 2.0]), np.zeros(2), np.array([3, 4]), np.array([1, 1])) is None


def test_swap_check_on_hand_made_arrays():
    r_pp, r_pn = np.array([1.0, 1.0, 0.0, 2.0]), np.array([0.0, 2.0, 0.0, 1.0])  # wins 1, 0, 0.5, 1
    r_np, r_nn = np.array([3.0, 3.0, 3.0, 3.0]), np.array([0.0, 0.0, 0.0, 4.0])  # wins 1, 1, 1, 0
    s = swap_check(r_pp, r_pn, r_np, r_nn)
    assert s == {"accuracy_pos_context": 0.625, "accuracy_neg_context": 0.75, "swap_accuracy": 0.6875}


def test_summarize_groups_by_module_and_omits_empty_ones():
    pair_module = np.array([0, 0, 2, 2, 2])
    r_pos, r_neg = np.array([1.0, 0.0, 3.0, 2.0, 1.0]), np.array([0.0, 1.0, 1.0, 1.0, 0.0])
    swap = {"pn": r_neg, "np": r_pos}
    lengths = np.array([5, 6, 7, 8, 9])
    m = summarize(["a", "b", "c"], pair_module, r_pos, r_neg, swap, lengths, lengths + 1)
    assert m["n_pairs"] == 5 and list(m["modules"]) == ["a", "c"]
    assert m["modules"]["a"]["accuracy"] == 0.5 and m["modules"]["c"]["accuracy"] == 1.0
    pooled = summarize(["all"], np.zeros(5, int), r_pos, r_neg, swap, lengths, lengths + 1)["modules"]["all"]
    assert {k: v for k, v in m["overall"].items() if k != "auc"} == {k: v for k, v in pooled.items() if k != "auc"}
    assert m["overall"]["auc"] == pytest.approx((m["modules"]["a"]["auc"] + m["modules"]["c"]["auc"]) / 2)
    assert set(m["overall"]) >= METRIC_KEYS and set(m["modules"]["c"]) >= METRIC_KEYS


# ---------------------------------------------------------------------------------------------- scoring


def test_score_pairs_matches_the_model_row_by_row(tmp_path):
    torch.manual_seed(0)
    model = RewardHeads(["a", "b"], 8, SMALL_HEADS).train()
    emb = np.random.default_rng(0).normal(size=(12, 8)).astype(np.float16)
    memmap = np.memmap(tmp_path / "emb.bin", dtype=np.float16, mode="w+", shape=emb.shape)
    memmap[:] = emb
    rows = {c: np.random.default_rng(i).integers(0, 12, 7) for i, c in enumerate(ROW_COLUMNS)}
    module_idx = np.array([0, 1, 1, 0, 1, 0, 0])
    scores = score_pairs(model, memmap, rows, module_idx, batch_size=3)
    assert model.training  # its mode is given back, so training validation can call it mid-epoch
    model.eval()

    def direct(ctx: str, mod: str) -> np.ndarray:
        with torch.no_grad():
            return np.array(
                [
                    model(
                        torch.from_numpy(emb[rows[ctx][i]][None]),
                        torch.from_numpy(emb[rows[mod][i]][None]),
                        torch.tensor([module_idx[i]]),
                    ).item()
                    for i in range(7)
                ]
            )

    expected = {
        "pp": direct("pos_ctx_row", "pos_mod_row"),
        "nn": direct("neg_ctx_row", "neg_mod_row"),
        "pn": direct("pos_ctx_row", "neg_mod_row"),
        "np": direct("neg_ctx_row", "pos_mod_row"),
    }
    for key, values in expected.items():
        np.testing.assert_allclose(scores[key], values, rtol=1e-5, atol=1e-6, err_msg=key)


def test_labels_for_clashing_stages():
    ckpt = dataclasses.make_dataclass("C", ["stage", "folder"])
    labels = labels_for([ckpt(0, Path("x/a")), ckpt(1, Path("b")), ckpt(0, Path("y/c")), ckpt(0, Path("z/c"))])
    assert labels == ["stage0-a", "stage1", "stage0-c-2", "stage0-c-3"]


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def _eval_setup(tmp_path_factory, tiny_qwen3, seed_pairs_path, make_config):
    """A tiny cache of the seed pairs, two random stage-0 checkpoints over it, and an eval file whose module
    texts the cache has never seen (so the first eval must encode them)."""
    root = tmp_path_factory.mktemp("eval")
    config = make_config(tiny_qwen3, max_context_tokens=256, max_module_tokens=128)  # short: fast on CPU
    config.heads = SMALL_HEADS
    cache = root / "cache"
    embed_files([seed_pairs_path], cache, config, progress=False)
    fingerprint = describe(config.encoder).fingerprint
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = RewardHeads(list(DEFAULT_MODULES), fingerprint.dim, SMALL_HEADS)
        folder = root / f"ckpt{seed}"
        save_heads(folder, model, config, fingerprint, 0, str(cache), {}, trained_on=[])
        ckpts.append(folder)
    records = json.loads(seed_pairs_path.read_text())
    for record in records[::4]:
        record["positive"]["module_k_all_rounds"] += REVISED
    data = root / "eval_pairs.json"
    data.write_text(json.dumps(records))
    return {"root": root, "cache": cache, "ckpts": ckpts, "data": data, "records": records, "config": config}


def _texts_rows(cache: Path) -> int:
    return pq.read_table(cache / "texts.parquet").num_rows


@pytest.mark.slow
def test_evaluate_writes_metrics_plots_report_and_reuses_the_cache(_eval_setup):
    s = _eval_setup
    pairs_before = (s["cache"] / "pairs.parquet").read_bytes()
    rows_before = _texts_rows(s["cache"])
    out = s["root"] / "out1"
    results = evaluate([s["ckpts"][0]], s["data"], out, progress=False)

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(results) == ["stage0"] and metrics == json.loads(json.dumps(results["stage0"]))
    assert metrics["n_pairs"] == 32 and set(metrics["modules"]) == set(DEFAULT_MODULES)
    assert set(metrics["overall"]) >= METRIC_KEYS
    assert all(set(m) >= METRIC_KEYS and m["n_pairs"] == 8 for m in metrics["modules"].values())
    revised = {
        r["positive"]["module_k_all_rounds"]
        for r in s["records"]
        if r["positive"]["module_k_all_rounds"].endswith(REVISED)
    }
    assert metrics["embed"]["encoded"] == len(revised) > 0  # the revised module texts, nothing else
    for plot in ("score_distributions.png", "roc_curves.png"):
        assert (out / plot).read_bytes()[:8] == PNG_MAGIC
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["pair_id"] for r in scores] == [r["pair_id"] for r in s["records"]]
    report = (out / "report.md").read_text()
    for module in DEFAULT_MODULES:
        assert sum(line.startswith(f"| {module} |") for line in report.splitlines()) == 1
    assert "roc_curves.png" in report and "score_distributions.png" in report
    assert _texts_rows(s["cache"]) == rows_before + len(revised)
    assert (s["cache"] / "pairs.parquet").read_bytes() == pairs_before  # eval never replaces the training index

    again = evaluate([s["ckpts"][0]], s["data"], s["root"] / "out2", progress=False)["stage0"]
    assert again["embed"]["encoded"] == 0 and _texts_rows(s["cache"]) == rows_before + len(revised)
    assert again["overall"] == metrics["overall"]
    assert (s["cache"] / "pairs.parquet").read_bytes() == pairs_before


@pytest.mark.slow
def test_evaluate_two_checkpoints_side_by_side(_eval_setup):
    s = _eval_setup
    out = s["root"] / "both"
    results = evaluate(s["ckpts"], s["data"], out, cache=s["cache"], progress=False)
    assert list(results) == ["stage0-ckpt0", "stage0-ckpt1"]
    for label in results:
        assert (out / label / "metrics.json").is_file() and (out / label / "roc_curves.png").is_file()
    table = format_table(results)
    assert "| module | stage0-ckpt0 accuracy | stage0-ckpt0 AUC | stage0-ckpt1 accuracy | stage0-ckpt1 AUC |" in table
    assert table in (out / "report.md").read_text()


def test_evaluate_split_uses_the_checkpoint_split(_eval_setup):
    s = _eval_setup
    d = s["config"].data
    expected = Counter(assign_split(r["task"], d.train_fraction, d.val_fraction, d.split_seed) for r in s["records"])
    result = evaluate([s["ckpts"][0]], s["data"], s["root"] / "test_split", split="test", progress=False)
    assert result["stage0"]["n_pairs"] == expected["test"] > 0


def test_evaluate_refuses_a_module_without_a_head(_eval_setup):
    s = _eval_setup
    records = json.loads(s["data"].read_text())
    records[5]["target_module"] = "critic"
    data = s["root"] / "critic.json"
    data.write_text(json.dumps(records))
    with pytest.raises(ModrmError, match=r"critic\.json: pair_id '.+', field 'target_module'.*critic.*reflection"):
        evaluate([s["ckpts"][0]], data, s["root"] / "bad", progress=False)


def test_evaluate_refuses_a_broken_checkpoint_or_another_encoder(_eval_setup, tmp_path):
    s = _eval_setup
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((s["ckpts"][0] / "config.json").read_bytes())
    with pytest.raises(ModrmError, match=HEADS_FILE):
        evaluate([broken], s["data"], tmp_path / "out", progress=False)

    config = s["config"]
    fingerprint = dataclasses.replace(describe(config.encoder).fingerprint, weights_sha256="0" * 64)
    other = tmp_path / "other"
    save_heads(
        other, RewardHeads(list(DEFAULT_MODULES), fingerprint.dim, SMALL_HEADS), config, fingerprint, 0, None, {}, []
    )
    with pytest.raises(ModrmError, match="weights_sha256"):
        evaluate([other], s["data"], tmp_path / "out", cache=s["cache"], progress=False)


@pytest.mark.slow
def test_a_checkpoint_trained_on_a_gpu_evaluates_anywhere(_eval_setup, tmp_path):
    """The training device is saved in the config ("cuda" after `--device cuda`); evaluation runs on the device
    it is given (auto here: the CPU in CI) with the same results, not on the one the config names."""
    s = _eval_setup
    gpu_made = tmp_path / "gpu_made"
    gpu_made.mkdir()
    for name in ("heads.safetensors", "metrics.json"):
        (gpu_made / name).write_bytes((s["ckpts"][0] / name).read_bytes())
    meta = json.loads((s["ckpts"][0] / "config.json").read_text())
    for section in ("encoder", "train", "finetune"):
        meta["config"][section]["device"] = "cuda"
    (gpu_made / "config.json").write_text(json.dumps(meta))
    expected = evaluate([s["ckpts"][0]], s["data"], tmp_path / "as_saved", cache=s["cache"], progress=False)
    got = evaluate([gpu_made], s["data"], tmp_path / "moved", cache=tmp_path / "cache", progress=False)
    assert got["stage0"]["embed"]["encoded"] > 0  # the encoder was loaded: on the device given, not "cuda"
    for key in ("accuracy", "auc", "separation"):
        assert got["stage0"]["overall"][key] == pytest.approx(expected["stage0"]["overall"][key], abs=1e-5)


@pytest.mark.slow
def test_auto_split_leaves_out_what_the_checkpoint_trained_on(stage0, seed_pairs_path, tmp_path):
    """stage0 trained on the seed pairs: by default only their test split is scored, and the report says why;
    the same pairs in a file the checkpoint never saw are scored whole."""
    config = load_checkpoint(stage0).config.data
    test = [
        r
        for r in json.loads(seed_pairs_path.read_text())
        if assign_split(r["task"], config.train_fraction, config.val_fraction, config.split_seed) == "test"
    ]
    own = evaluate([stage0], seed_pairs_path, tmp_path / "own", progress=False)["stage0"]
    assert own["split"] == "test" and own["n_pairs"] == len(test) > 0
    assert "trained on this file" in own["split_reason"]
    assert "trained on this file" in (tmp_path / "own" / "report.md").read_text()
    copy = tmp_path / "renamed.json"
    copy.write_bytes(seed_pairs_path.read_bytes())  # the same content under another name is still recognised
    assert evaluate([stage0], copy, tmp_path / "copy", progress=False)["stage0"]["n_pairs"] == len(test)
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps([{**r, "pair_id": r["pair_id"] + "-x"} for r in json.loads(seed_pairs_path.read_text())])
    )
    unseen = evaluate([stage0], other, tmp_path / "unseen", progress=False)["stage0"]
    assert unseen["split"] == "all" and unseen["n_pairs"] == 32 and "never trained" in unseen["split_reason"]


@pytest.mark.slow
def test_training_curves_of_both_stages(stage0, tmp_path):
    from pipeline.evaluate import training_curves
    from pipeline.finetune import finetune

    ckpt0 = load_checkpoint(stage0)
    curves = training_curves(ckpt0)
    log = [json.loads(line) for line in (stage0 / "metrics.jsonl").read_text().splitlines()]
    assert curves["val loss"] == ([float(r["epoch"]) for r in log], [r["val_loss"] for r in log])
    settings = {"finetune": {"epochs": 2, "token_budget": 4096, "encoder_lr": 1e-3}}
    result = finetune(
        stage0, [Path(__file__).parent / "fixtures" / "seed_training_pairs.json"], tmp_path, settings, progress=False
    )
    x, y = training_curves(load_checkpoint(tmp_path))["train loss"]
    assert y == [s["loss"] for s in result["steps"]] and x[-1] == 2.0 and all(a < b for a, b in itertools.pairwise(x))
    assert training_curves(load_checkpoint(tmp_path))["val loss"][0] == [0.0, 1.0, 2.0]
