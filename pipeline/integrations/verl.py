"""verl's `custom_reward_function`, scored by a running `modrm serve`.

    # verl config (the path: python -c "import pipeline.integrations.verl as v; print(v.__file__)")
    custom_reward_function:
      path: /.../site-packages/pipeline/integrations/verl.py
      name: compute_score

The reward workers need MODRM_URL (e.g. http://10.0.0.5:8000) in their environment, MODRM_API_KEY when the
server was started with --api-key-env, and optionally MODRM_TIMEOUT (seconds, default 60). The response is
the trajectory; the task is `extra_info["task"]` (put it in your dataset's extra_info), else empty.
Only the standard library is used, so verl's workers need nothing beyond modrm itself.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request


def compute_score(data_source: str, solution_str: str, ground_truth: object, extra_info: dict | None = None) -> dict:
    """{"score": the server's reward (its module weights applied), "<module>": that module's reward, ...};
    a module the trajectory has no text for is NaN, so every sample carries the same keys."""
    url = os.environ.get("MODRM_URL")
    if not url:
        raise RuntimeError("pipeline.integrations.verl: set MODRM_URL to a running `modrm serve` (http://HOST:PORT)")
    task = (extra_info or {}).get("task") or ""
    request = urllib.request.Request(
        url.rstrip("/") + "/get_reward",
        data=json.dumps({"query": [solution_str], "prompts": [task]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    if os.environ.get("MODRM_API_KEY"):
        request.add_header("Authorization", f"Bearer {os.environ['MODRM_API_KEY']}")
    try:
        with urllib.request.urlopen(request, timeout=float(os.environ.get("MODRM_TIMEOUT", "60"))) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"modrm serve at {url}: HTTP {err.code}: {err.read().decode(errors='replace')}") from None
    modules = {m: math.nan if v[0] is None else v[0] for m, v in answer["extra_logs"].items()}
    return {"score": answer["rewards"][0], **modules}
