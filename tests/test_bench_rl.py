"""`bench/bench_rl.py` and its environment `bench/rl_env.py`: the environment's success is what it says, the
reward model's data and the control's are what they claim, the HTTP path scores as the in-process model does, and
a quick run shows what is robust at its size."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_rl
import rl_env
from test_serve_fuzz import serving

from pipeline.cache import Cache
from pipeline.reward import RewardModel


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`bench_rl.py --quick` once for the module: its output folder and results."""
    out = tmp_path_factory.mktemp("bench-rl")
    return out, bench_rl.main(["--quick", "--out", str(out)])


@pytest.fixture(scope="module")
def tasks() -> list[rl_env.Task]:
    return rl_env.draw_tasks(6, "policy", seed=0)


def sampled_success(tasks: list[rl_env.Task], pick, episodes: int, seed: int = 0) -> float:
    """The share of sampled episodes whose outcome was 1, `pick(rng, task)` choosing each episode's picks."""
    rng = np.random.default_rng(seed)
    wins = 0
    for i in range(episodes):
        task = tasks[i % len(tasks)]
        wrong = task.wrong(pick(rng, task)).sum()
        wins += rng.random() < rl_env.success_probability(wrong)
    return wins / episodes


def test_an_oracle_policy_reaches_the_target_and_a_random_one_does_not(tasks):
    oracle = sampled_success(tasks, lambda rng, task: task.good_picks(), 4000)
    random = sampled_success(tasks, lambda rng, task: rng.integers(len(rl_env.KINDS), size=task.decisions), 4000)
    assert oracle == pytest.approx(rl_env.expected_success(np.ones(4)), abs=0.02)
    assert oracle > bench_rl.TARGET
    assert random == pytest.approx(rl_env.expected_success(np.full(4, 1 / 3)), abs=0.02)
    assert random < 0.15


def test_expected_success_is_the_sampled_rate_of_a_mixed_policy(tasks):
    p_good = np.array([0.9, 0.5, 0.7, 0.2])

    def pick(rng, task):
        good = task.good_picks()
        right = rng.random(task.decisions) < p_good
        return [g if ok else (g + 1) % len(rl_env.KINDS) for g, ok in zip(good, right, strict=True)]

    assert sampled_success(tasks, pick, 20000) == pytest.approx(rl_env.expected_success(p_good), abs=0.01)


def test_each_decision_has_one_good_one_subtle_and_one_blatant_candidate(tasks):
    for task in tasks:
        for options in task.candidates:
            for module, choices in zip(rl_env.MODULES, options, strict=True):
                assert sorted(c.kind for c in choices) == sorted(rl_env.KINDS), (task.task, module)
                assert len({c.text for c in choices}) == len(choices)
        assert not task.wrong(task.good_picks()).any()


def test_reward_model_policy_and_test_never_share_a_group_or_a_text():
    policy, test = rl_env.draw_tasks(16, "policy", seed=0), rl_env.draw_tasks(16, "test", seed=0)
    pairs = rl_env.reward_model_pairs(20, seed=0)
    groups = [{t.group for t in policy}, {t.group for t in test}, {p.group for p in pairs}]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])
    seen = {c.text for t in policy for options in t.candidates for choices in options for c in choices}
    seen_by_rm = " ".join(p.positive.context + p.negative.context for p in pairs)
    for task in test:
        for options in task.candidates:
            for choices in options:
                good = next(c for c in choices if c.good)
                assert good.text not in seen
                assert all(text not in seen_by_rm for text in good.texts.values())
    # test tasks are written in synth's held-out variant of each phrasing, which training never draws
    assert not opening_words(test) & opening_words(policy)


def opening_words(tasks: list[rl_env.Task]) -> set[tuple[str, str]]:
    """(module, first two words) of every good candidate, the round label left out: the phrasing it was written in."""
    return {
        (module, " ".join(next(c for c in choices if c.good).text.removeprefix("Round 1: ").split()[:2]))
        for task in tasks
        for options in task.candidates
        for module, choices in zip(rl_env.MODULES, options, strict=True)
    }


def test_the_control_sees_each_pair_swapped_or_not_at_random():
    pairs = rl_env.reward_model_pairs(50, seed=0)
    control = rl_env.shuffled_labels(pairs, seed=0)
    swapped = [c.positive == p.negative and c.negative == p.positive for p, c in zip(pairs, control, strict=True)]
    kept = [c == p for p, c in zip(pairs, control, strict=True)]
    assert all(s or k for s, k in zip(swapped, kept, strict=True))
    assert 0.35 < np.mean(swapped) < 0.65


def test_the_weak_reward_model_s_pairs_have_blatant_negatives_only():
    pairs = rl_env.blatant_pairs(6, seed=0)
    assert [p.target_module for p in pairs] == [m for m in rl_env.MODULES for _ in range(6)]
    assert all(rl_env.role(p.group) == "reward_model" for p in pairs)
    outputs = {kind: {} for kind in rl_env.KINDS}  # kind -> module -> texts of every candidate of some tasks
    for task in rl_env.draw_tasks(12, "policy", seed=0):
        for module, choices in zip(rl_env.MODULES, task.candidates[0], strict=True):
            for c in choices:
                outputs[c.kind].setdefault(module, []).append(c.texts.values())
    for pair in pairs:
        m = pair.target_module
        assert pair.positive.module_text != pair.negative.module_text
        assert any(all(t in pair.negative.context for t in texts) for texts in outputs["blatant"][m])
        assert not any(all(t in pair.negative.context for t in texts) for texts in outputs["subtle"][m])


@pytest.mark.slow
def test_each_reward_model_s_cache_holds_the_pairs_it_was_trained_on(quick_run):
    """`serve --learn` replays a checkpoint's training pairs from the cache it records: the control's must be its
    shuffled pairs and the reward model's its own."""
    checkpoints, summaries = bench_rl.build_reward_models(quick_run[0], bench_rl.QUICK)  # the quick run's models
    caches = {name: json.loads((path / "config.json").read_text())["cache"] for name, path in checkpoints.items()}
    assert caches["rm"] != caches["control"]
    indexes = {name: Cache.open(cache).read_pairs(["pair_id"]).to_pydict() for name, cache in caches.items()}
    rm, control = indexes["rm"], indexes["control"]
    assert rm["pair_id"] == control["pair_id"]
    swapped = np.array(control["pos_ctx_row"]) == np.array(rm["neg_ctx_row"])
    kept = np.array(control["pos_ctx_row"]) == np.array(rm["pos_ctx_row"])
    assert (swapped | kept).all() and 0.3 < swapped.mean() < 0.7
    assert summaries["rm"]["pairs"] == summaries["control"]["pairs"] == len(rm["pair_id"])


def test_advantages_are_normalised_per_module_within_the_group():
    rewards = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 4.0], [1.0, 0.0, 6.0]])
    advantages = bench_rl.group_advantages(rewards)
    assert advantages[:, 1].tolist() == [0.0, 0.0, 0.0]  # all equal: no signal
    assert np.allclose(advantages.mean(axis=0), 0.0)
    assert np.allclose(advantages[:, [0, 2]].std(axis=0), 1.0)
    assert advantages[2, 2] > advantages[1, 2] > advantages[0, 2]


def test_module_credit_follows_each_module_s_own_reward():
    wrong = np.array([[True, False, False, False], [False, False, False, True]])
    labels = bench_rl.module_labels(wrong)
    assert labels.tolist() == [[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
    advantages = bench_rl.group_advantages(labels)
    assert advantages[0, 0] < advantages[1, 0] and advantages[0, 3] > advantages[1, 3]


@pytest.mark.parametrize(
    ("flags", "says"),
    [(["--arms", "outcome,modul"], "--arms: unknown modul"), (["--checkpoint", "{tmp}"], "not a checkpoint folder")],
)
def test_bad_flags_are_one_line_naming_the_flag(flags, says, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit:
        bench_rl.parse_args([f.format(tmp=tmp_path) for f in flags])
    assert exit.value.code == 2
    assert says in capsys.readouterr().err


@pytest.mark.slow
def test_http_rewards_are_the_in_process_reward_model_s(stage0: Path, tasks, tmp_path: Path):
    rng = np.random.default_rng(0)
    items = [
        {"task": task.task, "trajectory": task.trajectory(rng.integers(len(rl_env.KINDS), size=task.decisions))}
        for task in tasks
    ]
    rm = RewardModel.load(stage0, device="cpu")
    expected = np.array([[row[m] for m in rl_env.MODULES] for row in rm.score(items)])
    with serving(rm, header_timeout_s=0.5) as (url, _):  # `modrm serve`'s app (bench_rl.serving: the online arm's test)
        client = bench_rl.RewardClient(int(url.rsplit(":", 1)[1]))
        served = client.score(items)
        time.sleep(1.5)  # the server closes the idle keep-alive connection; the client opens a new one
        again = client.score(items[:2])
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again, expected[:2], rtol=1e-5, atol=1e-6)
    assert len({tuple(row) for row in served}) > 1  # the trajectories differ, and so do their rewards
    assert client.requests == 2 and client.trajectories == len(items) + 2


@pytest.mark.slow
def test_quick_run_oracle_beats_outcome_and_the_control_does_not(quick_run):
    out, results = quick_run
    saved = json.loads((out / "results.json").read_text())
    assert (out / "success.png").stat().st_size > 0
    area = {arm: np.mean(saved["arms"][arm]["curve"]["mean"]) for arm in bench_rl.QUICK_ARMS}
    assert area["oracle"] > area["outcome"] + 0.02
    assert area["control"] < area["outcome"] + 0.02
    for arm in bench_rl.QUICK_ARMS:
        assert len(saved["arms"][arm]["final_success"]) == results["settings"]["seeds"]
        assert len(saved["arms"][arm][f"episodes_to_{bench_rl.TARGET}"]) == results["settings"]["seeds"]


class FakeLearningServer:
    """GET /versions and POST /rollouts of a `modrm serve --learn` that lists the new version `judged_after` polls
    after the post, and serves it (if accepted) one poll later still, as the swap between batches may lag."""

    def __init__(self, mined: int, status: str, judged_after: int = 3):
        self.mined, self.status, self.judged_after = mined, status, judged_after
        self.posted: list[dict] = []
        self.polls_after_post = 0

    def call(self, method: str, path: str, body: str | None = None, content_type: str = "") -> dict:
        if path == "/rollouts":
            self.posted = [json.loads(line) for line in body.splitlines()]
            return {"accepted": self.mined}
        versions, served = [{"version": "base-0", "status": "base"}], "base-0"
        if self.posted:
            self.polls_after_post += 1
            if self.polls_after_post > self.judged_after:
                versions.append({"version": "v0001", "status": self.status})
                if self.status == "accepted" and self.polls_after_post > self.judged_after + 1:
                    served = "v0001"
        return {"served": served, "versions": versions}


@pytest.mark.parametrize(("status", "polls"), [("accepted", 5), ("refused", 4)])
def test_a_refresh_posts_the_rollouts_and_waits_until_the_new_version_is_judged(tasks, status, polls):
    picks = np.zeros((3, tasks[0].decisions), dtype=int)
    rollouts = bench_rl.rollout_records(tasks[0], picks, np.array([1.0, 0.0, 1.0]), "group-7")
    server, refreshes = FakeLearningServer(mined=4, status=status), bench_rl.Refreshes()
    bench_rl.refresh(server, rollouts, refreshes)
    assert [r["outcome"] for r in server.posted] == [1.0, 0.0, 1.0]
    assert {r["task_id"] for r in server.posted} == {"group-7"} and server.posted[0]["task"] == tasks[0].task
    assert server.polls_after_post == polls  # served (accepted) or listed (refused), not before
    assert (refreshes.accepted, refreshes.refused, refreshes.no_pairs) == (status == "accepted", status == "refused", 0)


def test_rollouts_that_mine_no_pair_start_no_refresh_and_no_wait(tasks):
    picks = np.zeros((2, tasks[0].decisions), dtype=int)
    server, refreshes = FakeLearningServer(mined=0, status="accepted"), bench_rl.Refreshes()
    bench_rl.refresh(server, bench_rl.rollout_records(tasks[0], picks, np.ones(2), "group-0"), refreshes)
    assert server.polls_after_post == 0
    assert (refreshes.accepted, refreshes.refused, refreshes.no_pairs) == (0, 0, 1)


@pytest.mark.slow
def test_the_online_arm_refreshes_its_reward_model_from_the_policy_s_rollouts(quick_run, tmp_path: Path):
    """One online run through a real `modrm serve --learn`: at 256 episodes its rollouts go to POST /rollouts and
    the run goes on once the learner has judged the version trained on the pairs mined from them."""
    for features in quick_run[0].glob("features-*.npy"):  # the quick run's policy features: nothing to encode
        shutil.copy(features, tmp_path)
    flags = ["--quick", "--arms", "online", "--seeds", "1", "--episodes", "512", "--refresh-every", "256"]
    results = bench_rl.main([*flags, "--out", str(tmp_path)])
    refreshes = results["arms"]["online"]["refreshes"]
    assert refreshes["per_run"] == [1] and refreshes["accepted"] + refreshes["refused"] == 1
    (version,) = (tmp_path / "learn" / "versions").iterdir()
    record = json.loads((version / "version.json").read_text())
    assert record["pairs_seen"] > 0 and record["status"] == ("accepted" if refreshes["accepted"] else "refused")
    (posted,) = (tmp_path / "learn" / "pairs").glob("*.jsonl")
    assert all("/group-" in json.loads(line)["pair_id"] for line in posted.read_text().splitlines())
    windows = results["arms"]["online"]["reward_model_calls"]["accuracy_on_rollouts_by_window"]
    assert windows["from_episode"] == [0, 256] and results["reward_model"]["weak_accuracy"] is not None
    assert refreshes["pair_accuracy_after"][0] is not None
