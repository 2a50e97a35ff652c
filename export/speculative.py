"""Draft-and-verify decoding (speculative decoding) on a loaded model, batch 1, KV cache.

Medusa heads (export.medusa) draft a chain of K tokens from the hidden state of the last accepted position; the model
reads [its last token, the K drafts] in one forward, the cache is rolled back past the first rejected draft, and the
step keeps the accepted drafts plus one token of the model's own. Greedy: a draft is accepted when it equals the
model's argmax, so the output is plain greedy's token for token. Sampling: the rejection rule of Leviathan et al.
(2023) / Chen et al. (2023), so the output is distributed as the model's own samples.

The two baselines come from transformers' generate, not from here: n-gram (prompt-lookup) drafting
(`prompt_lookup_num_tokens`) and a draft model (`assistant_model`); `library_generate` runs them and counts, from
the model's forward calls, what they drafted and kept."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from export.generate import Generation, generate
from export.medusa import MedusaHeads

PROMPT_LOOKUP_TOKENS = 4  # n-gram drafts per step (prompt-lookup), as many as the default number of heads
# what model.generate samples with when neither the call nor the model's generation_config sets a value
# (transformers' GenerationConfig._get_default_generation_params; a test keeps them equal)
SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


@dataclass(frozen=True)
class DraftCounts:
    """What drafting did in one generation. `steps`: the model's forwards after the prompt's (each verifies one draft
    and adds one token of the model's own); `drafted` / `accepted`: draft tokens verified / kept."""

    steps: int
    drafted: int
    accepted: int

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per verifying forward (tokens per forward is one more)."""
        return self.accepted / self.steps if self.steps else 0.0


def warp(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None) -> torch.Tensor:
    """(..., V) logits -> (..., V) probabilities, after temperature, top-k and top-p (nucleus) as transformers
    applies them (top-k first; top-p keeps the smallest set of likeliest tokens whose mass reaches top_p)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (..., V): mass of the likelier tokens
        drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sampling_settings(model: nn.Module, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None) -> tuple[float, int | None, float | None]:
    """(temperature, top_k, top_p) as model.generate samples: each argument, else the model's generation_config's
    value, else SAMPLING_DEFAULTS (so top_k is 50 unless set: plain sampling's, which the rejection rule must keep);
    top_k 0 and top_p 1 mean none, as in transformers."""
    config = getattr(model, "generation_config", None)

    def resolve(name: str, given: Any) -> Any:
        for value in (given, getattr(config, name, None)):
            if value is not None:
                return value
        return SAMPLING_DEFAULTS[name]

    k, p = int(resolve("top_k", top_k)), float(resolve("top_p", top_p))
    return float(resolve("temperature", temperature)), k or None, None if p >= 1.0 else p


def rejection_step(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """The speculative sampling rule. p: (k + 1, V) the model's distributions after each verified prefix, q: (k, V)
    the drafter's, drafts: (k,) tokens drawn from q. Draft i is kept with probability min(1, p_i(x) / q_i(x)); the
    first one refused is replaced by a draw from norm(max(0, p_i - q_i)); when all are kept, one more token is drawn
    from p_k. Returns (drafts kept n, the token that follows them): every token so chosen is distributed as p."""
    k = int(drafts.shape[0])
    u = torch.rand(k, generator=generator)  # (k,)
    for i in range(k):
        x = int(drafts[i])
        if float(u[i]) * float(q[i, x]) < float(p[i, x]):  # u < p/q without dividing by a zero q
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # (V,)
        if float(residual.sum()) <= 0:  # p_i == q_i: nothing to correct (reached only by rounding)
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))


def _rowwise_attention(original: Callable[..., Any], prompt_len: int | None) -> Callable[..., Any]:
    """An attention function that gives each query of a forward over new tokens behind a cache (q > 1 queries, more
    keys than queries: a verification) the output `original` gives it alone, as a one-token decoding step: query i
    attends through `original` to the first L - q + 1 + i keys (contiguous, as the cache holds them), with no mask
    unless its mask row hides something. One-token steps and a prefill of at most `prompt_len` tokens go to
    `original`; a longer prefill (the prompt and the first drafts in one forward, as transformers' assisted
    generation runs it) computes its first `prompt_len` queries as a prefill of the prompt alone would (a causal
    kernel's blocks depend on the length: a 204-query forward's first 200 rows differ from a 200-query one's) and
    the rest one by one."""

    def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        q, length = query.shape[2], key.shape[2]  # query (B, heads, q, D), key / value (B, kv heads, L, D)
        if q == 1 or (length == q and (prompt_len is None or q <= prompt_len)):
            return original(module, query, key, value, attention_mask, **kwargs)
        rows, first = [], 0
        if length == q:  # a prefill longer than the prompt
            first = cast(int, prompt_len)
            rows.append(original(module, query[:, :, :first], key[:, :, :first].contiguous(),
                                 value[:, :, :first].contiguous(),
                                 None if attention_mask is None else attention_mask[..., :first, :first],
                                 **kwargs)[0])  # (B, prompt_len, heads, D)
        for i in range(first, q):
            seen = length - q + 1 + i
            mask = None if attention_mask is None else attention_mask[..., i:i + 1, :seen]
            if mask is not None and bool(mask.all() if mask.dtype == torch.bool else (mask == 0).all()):
                mask = None  # nothing hidden: a decoding step gets no mask either
            rows.append(original(module, query[:, :, i:i + 1], key[:, :, :seen].contiguous(),
                                 value[:, :, :seen].contiguous(), mask, **kwargs)[0])  # (B, 1, heads, D)
        return torch.cat(rows, 1), None  # (B, q, heads, D)

    return attend


FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def certified_argmax(logits: torch.Tensor, states: torch.Tensor, weight: torch.Tensor,
                     row_norm: float | None = None) -> torch.Tensor:
    """Which rows of a float32 product `logits` (..., n, V) = states (..., n, H) @ weight (V, H)^T have the argmax
    that any other float32 evaluation of the same row (the one-row product plain decoding runs, another blocking or
    summation order) must also give: (..., n) bool. Each computed logit is within gamma_H * ||w_v|| * ||h|| of the
    exact dot product (gamma_H = H u / (1 - H u), u = 2^-24; Higham, Accuracy and Stability of Numerical
    Algorithms, 2002, section 3.1, with Cauchy-Schwarz), so two evaluations differ by at most twice that, and a row
    whose top logit leads the next by more than 4 gamma_H max_v ||w_v|| ||h|| keeps its argmax in both (unique).
    `row_norm`: max_v ||w_v|| when known. Rows with a non-finite value are not certified."""
    h = states.shape[-1]
    gamma = h * FLOAT32_UNIT_ROUNDOFF / (1 - h * FLOAT32_UNIT_ROUNDOFF)
    norm = float(weight.float().norm(dim=1).max()) if row_norm is None else row_norm
    top = logits.topk(2, dim=-1).values  # (..., n, 2)
    bound = 4 * gamma * norm * states.float().norm(dim=-1)  # (..., n)
    return torch.isfinite(top).all(-1) & (top[..., 0] - top[..., 1] > bound)


@contextmanager
def exact_verification(model: nn.Module, prompt_len: int | None = None,
                       greedy: bool = False) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Within: a forward over several new tokens behind a KV cache computes every row as a one-token forward (plain
    decoding's) does: attention query by query (_rowwise_attention) and the lm_head row by row; a first forward
    longer than `prompt_len` (prompt and drafts at once) computes the prompt's rows as plain decoding's prefill.
    Plain greedy and draft-and-verify then see the same logits bit for bit wherever the linears are row-invariant
    (torch's CPU int4 kernel is; float32 matmuls are not, docs/speculative.md). Without it, a 4-bit model's
    verification rounded differently from decoding (transformers' SDPA packs a lone query's GQA heads, several
    queries take another path; 1e-7 there, amplified by the int4 kernel's bfloat16 inputs to 0.2 in the logits) and
    a near-tie flipped. With `greedy`, where only each row's argmax matters, a float32 lm_head without bias reads its
    weight once for all rows and recomputes alone only the rows whose argmax certified_argmax cannot vouch for (a
    near-tie; reading a 113 MB lm_head once per row cost as much as the rest of a step). Yields the lm_head's own
    forward, unpatched, for drafting (no exactness needed there). The attention implementation and the lm_head are
    restored on exit."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    causal = cast(Any, model)
    before = causal.config._attn_implementation
    rowwise = f"rowwise_{before}"
    swap = before in ALL_ATTENTION_FUNCTIONS.valid_keys()  # "eager" is the model's own function: left as it is
    if swap:
        AttentionInterface.register(rowwise, _rowwise_attention(ALL_ATTENTION_FUNCTIONS[before], prompt_len))
    lm_head = causal.get_output_embeddings()
    whole = lm_head.forward

    weight: torch.Tensor = getattr(lm_head, "weight", torch.empty(0))
    once = greedy and type(lm_head) is nn.Linear and lm_head.bias is None and weight.dtype == torch.float32
    row_norm = float(weight.detach().norm(dim=1).max()) if once else None

    def alone(states: torch.Tensor, i: int) -> torch.Tensor:  # (..., n, H) -> (..., 1, V): row i as decoding runs it
        return whole(states[..., i:i + 1, :])

    def by_row(states: torch.Tensor) -> torch.Tensor:  # (..., n, H) -> (..., n, V), as n one-row products would
        if states.dim() < 2 or states.shape[-2] == 1:
            return whole(states)
        if not (once and states.dtype == torch.float32):
            return torch.cat([alone(states, i) for i in range(states.shape[-2])], dim=-2)
        logits = whole(states)  # (..., n, V): the weight read once
        sure = certified_argmax(logits, states, weight, row_norm).reshape(-1, states.shape[-2]).all(0)  # (n,)
        for i in (~sure).nonzero().flatten().tolist():
            logits[..., i:i + 1, :] = alone(states, i)
        return logits

    if swap:
        causal.set_attn_implementation(rowwise)
    lm_head.forward = by_row
    try:
        yield whole
    finally:
        del lm_head.forward
        if swap:
            causal.set_attn_implementation(before)


def _decoder(model: nn.Module) -> tuple[Any, Any, str]:
    """(the backbone returning final hidden states after the last norm, the lm_head, the backbone's name for the
    KV cache argument: `cache` from transformers 5.x where `past_key_values` is deprecated, else the latter)."""
    causal = cast(Any, model)
    decoder = causal.get_decoder()
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    return decoder, causal.get_output_embeddings(), cache_arg


def _eos_ids(model: nn.Module) -> set[int]:
    """The end-of-text ids model.generate stops at: its generation_config's (which may list several, as Llama 3's
    does), else its config's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # int, list or None
    eos = getattr(model.config, "eos_token_id", None) if eos is None else eos
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, list) else [eos])}


@torch.no_grad()
def speculative_generate(model: nn.Module, heads: MedusaHeads, ids: torch.Tensor, max_new_tokens: int,
                         do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                         top_p: float | None = None, generator: torch.Generator | None = None,
                         ) -> tuple[list[int], DraftCounts]:
    """Continue `ids` (1, T) by up to `max_new_tokens` tokens (exactly that many unless an end-of-text token, which
    is kept, comes first), drafting with `heads`; greedy unless `do_sample` (then temperature / top_k / top_p as
    model.generate resolves them, sampling_settings; drawn from `generator`). Returns (new token ids, draft counts)."""
    from transformers import DynamicCache

    decoder, lm_head, cache_arg = _decoder(model)
    eos = _eos_ids(model)
    heads = heads.to(dtype=lm_head.weight.dtype)
    temperature, top_k, top_p = sampling_settings(model, temperature, top_k, top_p)

    def choose(logits: torch.Tensor) -> torch.Tensor:  # (n, V) -> (n,) greedy picks or samples
        if not do_sample:
            return logits.argmax(-1)
        return torch.multinomial(warp(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]

    cache = DynamicCache(config=cast(Any, model).config)
    with exact_verification(model, greedy=not do_sample) as draft_lm_head:
        return _draft_and_verify(decoder, lm_head, draft_lm_head, cache_arg, cache, heads, ids, max_new_tokens, eos,
                                 choose, (temperature, top_k, top_p) if do_sample else None, generator)


def _draft_and_verify(decoder: Any, lm_head: Any, draft_lm_head: Callable[[torch.Tensor], torch.Tensor],
                      cache_arg: str, cache: Any, heads: MedusaHeads, ids: torch.Tensor, max_new_tokens: int,
                      eos: set[int], choose: Callable[[torch.Tensor], torch.Tensor],
                      warping: tuple[float, int | None, float | None] | None, generator: torch.Generator | None,
                      ) -> tuple[list[int], DraftCounts]:
    """speculative_generate's loop (inside exact_verification); `warping` (temperature, top_k, top_p) when sampling;
    `draft_lm_head` the lm_head as the heads use it (one product for all of them, not verification's)."""
    hidden = decoder(input_ids=ids, use_cache=True, **{cache_arg: cache}).last_hidden_state[0, -1:]  # (1, H)
    out = [int(choose(lm_head(hidden[None])[0])[0])]  # lm_head reads (1, 1, H) as in plain decoding
    steps = drafted = accepted = 0
    while len(out) < max_new_tokens and out[-1] not in eos:
        k = min(heads.num_heads, max_new_tokens - len(out) - 1)  # the step adds at most k + 1 tokens
        head_logits = heads(hidden[0], draft_lm_head)[:k]  # (k, V): head i guesses the token i + 1 after out[-1]
        q = None if warping is None else warp(head_logits, *warping)
        drafts = choose(head_logits)  # (k,)
        step_ids = torch.tensor([[out[-1], *drafts.tolist()]])  # (1, 1 + k)
        verified = decoder(input_ids=step_ids, use_cache=True, **{cache_arg: cache}).last_hidden_state[0]  # (1+k, H)
        logits = lm_head(verified[None])[0]  # (1 + k, V): row i is the next token after step_ids[0, :i + 1]
        if q is None:
            picks = logits.argmax(-1)  # (1 + k,)
            n = next((i for i in range(k) if int(drafts[i]) != int(picks[i])), k)
            token = int(picks[n])
        else:
            n, token = rejection_step(warp(logits, *cast(tuple, warping)), q, drafts, generator)
        cache.crop(-(k - n))  # keep out[-1] and the n accepted drafts; the refused drafts' keys and values go
        steps, drafted, accepted = steps + 1, drafted + k, accepted + n
        new = [*drafts[:n].tolist(), token]
        stop = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))  # an end of text ends the output
        out += new[:stop]
        hidden = verified[n:n + 1]  # (1, H): the state that predicted `token`
    return out, DraftCounts(steps, drafted, accepted)


def timed_speculative(model: nn.Module, heads: MedusaHeads, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int,
                      **sampling: Any) -> tuple[Generation, DraftCounts]:
    """speculative_generate, timed, as a Generation (first_token_seconds: nan; tokens come a step at a time)."""
    t0 = time.perf_counter()
    new, counts = speculative_generate(model, heads, ids, max_new_tokens, **sampling)
    seconds = time.perf_counter() - t0
    return Generation(tokenizer.decode(new, skip_special_tokens=True), new, int(ids.shape[1]), seconds,
                      float("nan")), counts


def library_generate(model: nn.Module, tokenizer: Any, ids: torch.Tensor, max_new_tokens: int, pad_token_id: int,
                     draft: str | nn.Module, **sampling: Any) -> tuple[Generation, DraftCounts]:
    """transformers' generate with its own drafting: `draft` "ngram" (prompt lookup, PROMPT_LOOKUP_TOKENS a step) or
    a draft model (assisted generation; same tokenizer). Counts come from the model's forward calls (each reads the
    tokens its cache lacks: the prompt, or the last token, then that call's drafts): steps = calls after the first,
    drafted = tokens read beyond the prompt and one a step, accepted = new tokens - calls (each call adds one token
    of the model's own; exact unless the last call was cut short by max_new_tokens or an end of text)."""
    lengths: list[int] = []

    def note(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        step_ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(int(step_ids.shape[1]) if step_ids is not None else 1)

    extra: dict[str, Any] = ({"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS} if draft == "ngram"
                             else {"assistant_model": draft})
    handle = model.register_forward_pre_hook(note, with_kwargs=True)
    try:
        with exact_verification(model, int(ids.shape[1]), greedy=not sampling.get("do_sample")):  # as decoding rounds
            gen = generate(model, tokenizer, ids, max_new_tokens, pad_token_id, **extra, **sampling)
    finally:
        handle.remove()
    drafted = sum(lengths) - int(ids.shape[1]) - (len(lengths) - 1)
    return gen, DraftCounts(len(lengths) - 1, drafted, max(0, min(drafted, gen.new_tokens - len(lengths))))
