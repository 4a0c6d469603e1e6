"""Every caller's protocol on the in-process server: slime's remote_rm, verl's vLLM /classify (a real chat template),
OpenRLHF's extra_logs with module masks, /stats and Prometheus' /metrics; each body as the framework sends it, each
answer read as the framework reads it, the rewards equal to /score's."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_fuzz import StandIn, poll, post, serving
from transformers import AutoTokenizer

from pipeline import RewardModel
from pipeline.reward import weighted_mean
from pipeline.serve import split_chat

pytestmark = pytest.mark.slow  # a server and a model: `make test-fast` skips them

SEED_PAIRS = Path(__file__).parent / "fixtures" / "seed_training_pairs.json"
MODULES = ["reflection", "planner", "executor", "memory"]
WEIGHTS = {"planner": 2.0, "executor": 1.0, "reflection": 1.0, "memory": 1.0}
PLAN_ONLY = "Round 1:\n<plan>read the logs</plan>"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
)


@pytest.fixture(scope="module")
def rm(stage0: Path) -> RewardModel:
    return RewardModel.load(stage0, device="cpu")


@pytest.fixture(scope="module")
def items() -> list[dict]:
    records = json.loads(SEED_PAIRS.read_text())
    return [{"task": r["task"], "trajectory": r["positive"]["trajectory_full_context"]} for r in records[:4]]


def scored(url: str, items: list[dict]) -> list[dict]:
    """/score's module rewards, what every protocol's rewards must equal."""
    status, answer = post(url + "/score", {"items": items})
    assert status == 200
    return answer["rewards"]


def test_slime_remote_rm_gets_score_rewards_by_name_with_a_mask(rm, items):
    with serving(rm, weights=WEIGHTS) as (url, _):
        expected = scored(url, [*items, {"task": "t", "trajectory": PLAN_ONLY}])
        for item, modules in zip([*items, {"task": "t", "trajectory": PLAN_ONLY}], expected, strict=True):
            payload = {"prompt": item["task"], "response": item["trajectory"], "label": None}  # slime's remote_rm
            status, result = post(url + "/slime", payload)
            assert status == 200
            assert result["reward"] == pytest.approx(weighted_mean(modules, WEIGHTS), abs=1e-5)  # --reward-key reward
            for module in MODULES:
                assert result[module] == (None if modules[module] is None else pytest.approx(modules[module], abs=1e-5))
                assert result[f"{module}_mask"] == (0.0 if modules[module] is None else 1.0)
        assert result["memory"] is None and result["memory_mask"] == 0.0 and result["planner_mask"] == 1.0

        chat = [{"role": "user", "content": items[0]["task"]}]  # slime without --apply-chat-template
        status, result = post(url + "/slime", {"prompt": chat, "response": items[0]["trajectory"], "label": "x"})
        assert status == 200 and result["reward"] == pytest.approx(weighted_mean(expected[0], WEIGHTS), abs=1e-5)
        status, result = post(url + "/slime", {"prompt": "p", "response": 3, "label": None})
        assert status == 400 and result == {"error": "'response': expected a string, got int"}


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
def test_a_chat_templated_prompt_and_response_splits_into_task_and_trajectory(stage0, items, template):
    tokenizer = AutoTokenizer.from_pretrained(stage0.parent / "qwen")
    task, trajectory = items[0]["task"], items[0]["trajectory"]
    messages = [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "an earlier task"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": task},
        {"role": "assistant", "content": trajectory},
    ]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert split_chat(text) == {"task": task.strip(), "trajectory": trajectory.strip()}
    assert split_chat("no template here") == {"task": "", "trajectory": "no template here"}


def test_verl_classify_reads_data_probs_as_the_score_reward(rm, stage0, items):
    """verl's reward loop: the chat template applied to raw_prompt + the response, posted to /classify with
    use_activation false, the score read as data[-1].probs[-1]."""
    tokenizer = AutoTokenizer.from_pretrained(stage0.parent / "qwen")
    with serving(rm, weights=WEIGHTS) as (url, _):
        expected = scored(url, [{"task": i["task"].strip(), "trajectory": i["trajectory"].strip()} for i in items])
        for item, modules in zip(items, expected, strict=True):
            messages = [{"role": "user", "content": item["task"]}, {"role": "assistant", "content": item["trajectory"]}]
            text = tokenizer.apply_chat_template(messages, chat_template=CHATML, tokenize=False)
            status, output = post(url + "/classify", {"model": str(stage0), "input": text, "use_activation": False})
            assert status == 200
            assert output["data"][-1]["probs"][-1] == pytest.approx(weighted_mean(modules, WEIGHTS), abs=1e-5)
            assert output["data"][-1]["modules"]["planner"] == pytest.approx(modules["planner"], abs=1e-5)
            assert output["data"][-1]["modules"]["planner_mask"] == 1.0

        texts = [f"<|im_start|>user\nt<|im_end|>\n<|im_start|>assistant\n{PLAN_ONLY}<|im_end|>\n"] * 2
        status, output = post(url + "/classify", {"model": "m", "input": texts})  # vLLM's default: the activation
        [plan_only] = scored(url, [{"task": "t", "trajectory": PLAN_ONLY}])
        reward = weighted_mean(plan_only, WEIGHTS)
        assert [d["index"] for d in output["data"]] == [0, 1] and output["model"] == "m"
        assert output["data"][1]["probs"] == [pytest.approx(1 / (1 + math.exp(-reward)), abs=1e-5)]
        assert output["data"][1]["modules"]["memory"] is None and output["data"][1]["modules"]["memory_mask"] == 0.0
        status, output = post(url + "/classify", {"input": "x", "use_activation": "no"})
        assert status == 400 and output == {"error": "'use_activation': expected true or false, got str"}


def test_openrlhf_extra_logs_carry_module_masks(rm):
    with serving(rm) as (url, _):
        status, answer = post(url + "/get_reward", {"query": [PLAN_ONLY, "no tags"], "prompts": ["t", "t"]})
    assert status == 200
    assert answer["extra_logs"]["planner_mask"] == [1.0, 0.0] and answer["extra_logs"]["memory_mask"] == [0.0, 0.0]
    assert answer["extra_logs"]["planner"][1] is None


def test_stats_give_running_mean_and_std_of_each_module_served(rm, items):
    with serving(rm) as (url, _):
        assert httpx.get(url + "/stats").json()["modules"]["planner"] == {"count": 0, "mean": None, "std": None}
        first = scored(url, items[:3])
        post(url + "/slime", {"prompt": "t", "response": PLAN_ONLY, "label": None})
        post(url + "/get_reward", {"query": [items[3]["trajectory"]], "prompts": [""]})
        stats = httpx.get(url + "/stats").json()["modules"]
    served = [*first, *rm.score([{"task": "t", "trajectory": PLAN_ONLY}, {**items[3], "task": ""}])]
    for module in MODULES:
        values = [s[module] for s in served if s[module] is not None]
        assert stats[module]["count"] == len(values)
        assert stats[module]["mean"] == pytest.approx(np.mean(values), abs=1e-5)
        assert stats[module]["std"] == pytest.approx(np.std(values), abs=1e-5)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of Prometheus' text format, read with prometheus_client's own parser."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics_in_prometheus_format_count_requests_errors_batches_texts_and_rewards(rm, items):
    with serving(rm) as (url, _):
        scored(url, items[:2])
        post(url + "/slime", {"prompt": "a task no other test sends", "response": PLAN_ONLY, "label": None})
        post(url + "/slime", {"prompt": "t"})
        post(url + "/classify", {"input": PLAN_ONLY}, content_type="text/plain")
        scored(url, items[:2])  # again: its texts come from the LRU
        response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "modrm_requests_total", endpoint="/score") == 2
    assert metric(text, "modrm_requests_total", endpoint="/slime") == 2
    assert metric(text, "modrm_request_errors_total", endpoint="/slime", status="400") == 1
    assert metric(text, "modrm_request_errors_total", endpoint="/classify", status="415") == 1
    assert metric(text, "modrm_request_latency_seconds_count", endpoint="/score") == 2
    assert metric(text, "modrm_batch_trajectories_count") == 3
    assert metric(text, "modrm_batch_trajectories_sum") == 5
    assert metric(text, "modrm_texts_encoded_total") > 0 and metric(text, "modrm_texts_from_cache_total") > 0
    planner = [s["planner"] for s in rm.score([*items[:2], {"task": "t", "trajectory": PLAN_ONLY}, *items[:2]])]
    assert metric(text, "modrm_module_reward_count", module="planner") == len([p for p in planner if p is not None])


def test_metrics_say_how_many_trajectories_wait_for_the_model(rm):
    gate = threading.Event()

    def score(model: RewardModel, items: list[dict]) -> list[dict]:
        gate.wait(60)  # the model is busy: what comes next waits in the queue
        return model.score(items)

    with serving(StandIn(rm, score)) as (url, app), ThreadPoolExecutor(2) as pool:
        body = {"items": [{"task": "t", "trajectory": PLAN_ONLY}] * 3}
        first = pool.submit(post, url + "/score", body)
        poll(lambda: app.state.service.batcher.waiting == 0 and app.state.service.batcher.last_batch_requests, "busy")
        second = pool.submit(post, url + "/score", body)
        poll(lambda: app.state.service.batcher.waiting == 3, "three trajectories queued")
        assert metric(httpx.get(url + "/metrics").text, "modrm_queue_trajectories") == 3
        gate.set()
        assert first.result()[0] == second.result()[0] == 200


def test_every_new_endpoint_needs_the_bearer_token(rm):
    with serving(rm, api_key="secret") as (url, _):
        for path in ("/stats", "/metrics"):
            assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer secret"}).status_code == 200
        for path, body in (("/slime", {"prompt": "t", "response": "r"}), ("/classify", {"input": "x"})):
            assert post(url + path, body)[0] == 401
            sent = httpx.post(url + path, json=body, headers={"Authorization": "Bearer secret"})
            assert sent.status_code == 200
