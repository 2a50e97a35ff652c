"""Tiny random Llama-family models saved as Hugging Face folders, built entirely in code (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a slice of the packaged pydoc corpus."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)[:20]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_config(arch: str, **over):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                  eos_token_id=0, bos_token_id=0, pad_token_id=0, rms_norm_eps=1e-5)
    common.update(over)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    return cls(**common)


def make_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **over) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **over))
    with torch.no_grad():  # larger-than-default weights so activations differ clearly between channels
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer().save_pretrained(folder)
    return Path(folder)


def verification_case(model, generator: torch.Generator, prompt_len: int, k: int):
    """A prompt (1, prompt_len) and k next tokens (1, k) drawn from the model's vocabulary, and two empty
    DynamicCaches: one for a k-token verifying forward, one for plain decoding's one-token forwards."""
    from transformers import DynamicCache

    prompt = torch.randint(1, model.config.vocab_size, (1, prompt_len), generator=generator)
    step = torch.randint(1, model.config.vocab_size, (1, k), generator=generator)
    return prompt, step, DynamicCache(config=model.config), DynamicCache(config=model.config)
