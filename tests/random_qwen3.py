"""A randomly initialised Qwen3 embedding model saved like Qwen/Qwen3-Embedding-0.6B, for tests and benchmarks.

The real weights cannot be downloaded here; this folder goes through exactly the same loading code
(AutoModel, AutoTokenizer, the sentence-transformers pooling files), so pooling, padding and the end token
are tested for real. `size="0.6b"` has the real architecture (honest for speed, meaningless for quality).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

END_TOKEN = "<|endoftext|>"
SIZES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
    "0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ),
}
_CORPUS = [
    "Round 1: <reflection> the plan looks incomplete </reflection> <plan> Step 1: read the logs </plan>",
    "<action> Using tool: code_analyzer </action> <tool results> Tool execution successful </tool results>",
    "<memory query> relevant context </memory query> <memory result> Found 2 entries </memory result>",
    "Task: Debug a memory leak in a web application. Optimize database query performance.",
    "The quick brown fox jumps over the lazy dog. 0123456789 {}[]()<>|:;,.!?'\"-_+=*/\\",
]


def build_tokenizer(append_end_token: bool = True, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the fly; like Qwen3-Embedding's, it appends the end token itself."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    if append_end_token:
        end_id = tok.token_to_id(END_TOKEN)
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {END_TOKEN}", pair=f"$A {END_TOKEN} $B {END_TOKEN}", special_tokens=[(END_TOKEN, end_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END_TOKEN, pad_token=END_TOKEN, padding_side="left", model_max_length=32768
    )


def plant_fp16_overflow(model: Qwen3Model, token_id: int, residual: float = 65000.0, mlp_std: float = 2000.0) -> None:
    """Make one token a "massive activation", as trained Qwen3 models have: its residual sits at the top of fp16's
    range (65504) and layer 0's MLP adds thousands, so in fp16 it overflows to inf and the NaN that follows spreads
    through attention to every later token, the pooled end token included. In fp32 (and bf16) nothing overflows,
    and texts without the token stay finite in fp16: the fp32 fallback is exercised for real."""
    import torch

    with torch.no_grad():
        model.embed_tokens.weight[token_id] = residual
        layer = model.layers[0]
        normed = layer.post_attention_layernorm(torch.full((1, model.config.hidden_size), residual))
        layer.mlp.down_proj.weight.mul_(mlp_std / layer.mlp(normed).std())


def build_random_qwen3(
    path: str | Path,
    size: str = "tiny",
    append_end_token: bool = True,
    seed: int = 0,
    overflow_trigger: str | None = None,
) -> Path:
    """Write a Qwen3 embedding model folder (weights, tokenizer, sentence-transformers files) to `path`.

    The real-size model is saved in bf16, as Qwen/Qwen3-Embedding-0.6B is; `overflow_trigger` names a token
    (one character of the byte-level alphabet, e.g. "~") that overflows fp16 (`plant_fp16_overflow`)."""
    import torch

    path = Path(path)
    tokenizer = build_tokenizer(append_end_token)
    end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
    vocab = len(tokenizer) if size == "tiny" else 151669
    config = Qwen3Config(
        vocab_size=vocab,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=end_id,
        eos_token_id=end_id,
        pad_token_id=end_id,
        **SIZES[size],
    )
    torch.manual_seed(seed)
    model = Qwen3Model(config)
    if overflow_trigger is not None:
        plant_fp16_overflow(model, tokenizer.convert_tokens_to_ids(overflow_trigger))
    model.to(torch.float32 if size == "tiny" else torch.bfloat16).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "1_Pooling").mkdir(exist_ok=True)
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
        "1_Pooling/config.json": {"word_embedding_dimension": config.hidden_size, "pooling_mode_lasttoken": True},
        "config_sentence_transformers.json": {
            "prompts": {
                "query": "Instruct: Given a web search query, retrieve relevant passages\nQuery:",
                "document": "",
            },
            "default_prompt_name": None,
        },
        "sentence_bert_config.json": {"max_seq_length": 32768, "do_lower_case": False},
    }
    for name, content in files.items():
        (path / name).write_text(json.dumps(content, indent=2))
    return path
