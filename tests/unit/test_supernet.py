"""The search engine's seams: the assembler applies only what changes and leaves the model dense however a search
ends; the fitness scores a batch through an executor, and a candidate's score neither depends on what was assembled
before it nor differs from a KL computed without the engine."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from compress.models import llama
from compress.search.base import Option, Unit
from compress.search.scoring import StagedKL, supernet_fitness
from compress.search.supernet import Assembler, VariantDB, WeightSwap


class _Recording:
    def __init__(self):
        self.calls = []

    def put(self, unit, level):
        self.calls.append((unit, level))

    def restore(self):
        self.calls.append("restore")


def test_assembler_applies_only_changes_and_restores_dense_however_the_search_ends():
    swap = _Recording()
    supernet = Assembler(swap)
    supernet.assemble({"a": 2, "b": 3})
    supernet.assemble({"a": 2, "b": 4})  # a holds 2 already
    assert swap.calls == [("a", 2), ("b", 3), ("b", 4)]
    with pytest.raises(KeyboardInterrupt), supernet:
        supernet.assemble({"a": 3})
        raise KeyboardInterrupt
    assert swap.calls[-2:] == [("a", 3), "restore"] and supernet.level == {}
    supernet.assemble({"a": 3})  # after a restore nothing is assumed to be in place
    assert swap.calls[-1] == ("a", 3)


class _Reversed:
    """Scores a batch last to first (as another worker might finish it) and returns the results in batch order."""

    def __init__(self):
        self.batches = []

    def map(self, fn, items):
        self.batches.append(len(items))
        return [fn(x) for x in reversed(items)][::-1]


def _grid(weight, level):
    return (weight * 2**level).round() / 2**level  # a deterministic stand-in for a quantized variant


def _kl_by_hand(dense_model, model, windows):
    """Mean per-token KL(dense || model) from two plain forwards, without the engine."""
    with torch.no_grad():
        ref = F.log_softmax(dense_model(input_ids=windows).logits.float(), -1)
        logp = F.log_softmax(model(input_ids=windows).logits.float(), -1)
    return float((ref.exp() * (ref - logp)).sum() / windows.numel())


def test_fitness_scores_a_batch_in_one_call_whatever_the_order_and_as_a_plain_kl(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    linears = {name: lin for name, (_, _, lin) in llama.named_linears(model).items()}
    members = {}
    for name, (i, short, _) in llama.named_linears(model).items():
        members.setdefault(f"layer{i}.{'attn' if short in llama.ATTN else 'mlp'}", []).append(name)
    dense = {name: lin.weight.data.clone() for name, lin in linears.items()}
    supernet = Assembler(WeightSwap(linears, members, lambda name, level: _grid(dense[name], level), dense))
    score = StagedKL(model, windows, [2, 4], batch_size=2)
    units = [Unit(u, (Option(2, 2.0), Option(3, 3.0), Option(5, 5.0))) for u in members]
    rng = random.Random(0)
    candidates = [{u.name: rng.randrange(3) for u in units} for _ in range(6)]
    with supernet:
        local = supernet_fitness(units, supernet, score)(candidates, 1)
        executor = _Reversed()
        reversed_order = supernet_fitness(units, supernet, score, executor)(candidates, 1)
        assert executor.batches == [6]  # one call for the whole batch
        assert reversed_order == local  # no state leaks from one candidate into the next
        assert len(set(local)) > 1 and min(local) > 1e-4
        few = supernet_fitness(units, supernet, score)(candidates[:1], 0)
    for name, lin in linears.items():  # dense again
        assert torch.equal(lin.weight, dense[name])
    by_hand = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for name, (i, short, lin) in llama.named_linears(by_hand).items():
        unit = next(u for u in units if name in members[u.name])
        lin.weight.data = _grid(lin.weight.data, unit.options[candidates[0][unit.name]].level)
    assert local[0] == pytest.approx(_kl_by_hand(reference, by_hand, windows), rel=1e-4)
    assert few[0] == pytest.approx(_kl_by_hand(reference, by_hand, windows[:2]), rel=1e-4)


def test_structure_swap_gives_the_same_model_whatever_was_assembled_before(tiny_llama):
    from compress.passes.prune_tyr import OUT_PROJ, _StructureSwap, _units

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    blocks = llama.blocks(model)
    dense = {i: {n: (lin.weight.data.clone(), None if lin.bias is None else lin.bias.data.clone())
                 for n, lin in llama.linears(b).items()} for i, b in enumerate(blocks)}
    units = _units(model)
    db = VariantDB(None)
    widths = {}
    for u in units:  # variants: the first k structures kept, the out projection cut to their columns (no refit)
        widths[u.name] = sorted({max(1, u.width // 3), max(1, 2 * u.width // 3), u.width})
        for k in widths[u.name][:-1]:
            keep = torch.arange(k)
            cols = (keep[:, None] * u.size + torch.arange(u.size)).flatten()
            db.put(u.name, k, {"keep": keep, "weight": dense[u.layer][OUT_PROJ[u.kind]][0][:, cols]})
    swap = _StructureSwap(blocks, dense, units)
    swap.use(db)
    supernet = Assembler(swap)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits

    supernet.restore_dense()
    before = logits()
    rng = random.Random(2)
    draws = [{u.name: rng.choice(widths[u.name]) for u in units} for _ in range(4)]
    for target in draws:
        supernet.assemble(target)  # reached from whatever the previous draw left
        walked = logits()
        supernet.restore_dense()
        supernet.assemble(target)  # reached from dense
        assert torch.equal(walked, logits())
        assert all(len(swap.kept[u.name]) == target[u.name] for u in units)
    assert not torch.equal(walked, before)  # the last draw prunes something
    supernet.restore_dense()
    assert torch.equal(logits(), before)
