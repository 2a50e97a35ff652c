"""The device policy (compress.device): recipe values resolve to a torch device or are refused naming the field, and
the block engine and the search's scorer put the block under work, its activations and its statistics on the device
and everything back on the CPU. No GPU here: the moves are recorded by stand-ins for compress.device's functions (the
maths itself runs on the CPU); benchmarks/gpu_smoke.py runs the default recipes on CUDA when a GPU is lent."""

from __future__ import annotations

import pytest
import torch

import calibration.capture as capture
import compress.device as dev
from compress.errors import InputError
from compress.models import llama

CUDA0 = torch.device("cuda", 0)


def _model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # 3 blocks


def test_resolve_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dev.resolve("cpu") == dev.CPU
    assert dev.resolve("auto") == dev.CPU


def test_resolve_with_two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dev.resolve("auto") == CUDA0
    assert dev.resolve("cuda") == CUDA0
    assert dev.resolve("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve("cpu") == dev.CPU
    with pytest.raises(InputError, match=r"^device: 'cuda:2' asked for, but only 2 CUDA device\(s\) are visible"):
        dev.resolve("cuda:2")


def test_resolve_cuda_without_a_gpu_names_the_field_and_the_way_out(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError) as err:
        dev.resolve("cuda", where="recipe.device")
    assert str(err.value).startswith("recipe.device: 'cuda' asked for, but torch ")
    assert "use device: cpu" in str(err.value)


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:123", " cpu", "mps"])
def test_resolve_refuses_other_forms(bad):
    with pytest.raises(InputError, match="is not auto, cpu, cuda or cuda:N"):
        dev.resolve(bad)


def test_to_device_walks_nested_values_and_keeps_the_rest():
    t = torch.ones(2)
    value = {"a": (t, 3, [t, None]), "b": "text"}
    moved = dev.to_device(value, dev.CPU)
    assert moved["a"][0] is t and moved["a"][2][0] is t  # already there: no copy
    assert moved["a"][1] == 3 and moved["a"][2][1] is None and moved["b"] == "text"
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][2], list)


def test_on_device_moves_back_when_the_body_raises(monkeypatch):
    moves: list[torch.device] = []
    monkeypatch.setattr(dev, "move", lambda _m, d: moves.append(d))
    with pytest.raises(RuntimeError), dev.on_device(torch.nn.Linear(2, 2), CUDA0):
        raise RuntimeError("in the body")
    assert moves == [CUDA0, dev.CPU]


class _Recorder:
    """Stand-ins for move / to_device that record what was sent where (and move nothing)."""

    def __init__(self, model):
        self.names = {id(b): f"block{i}" for i, b in enumerate(llama.blocks(model))}
        self.events: list[tuple[str, str]] = []

    def move(self, module, device) -> None:
        self.events.append(("move", f"{self.names.get(id(module), type(module).__name__)}->{device}"))

    def to_device(self, value, device):
        kind = "hidden" if isinstance(value, list) and value and isinstance(value[0], torch.Tensor) else "kwargs"
        self.events.append(("to", f"{kind}->{device}"))
        return value


def test_for_each_block_puts_each_block_and_its_activations_on_the_device(monkeypatch, tiny_llama):
    model = _model(tiny_llama)
    rec = _Recorder(model)
    monkeypatch.setattr(capture, "move", rec.move)
    monkeypatch.setattr(capture, "to_device", rec.to_device)
    moved_stats: list[torch.device] = []
    monkeypatch.setattr(capture.LinearStats, "to_", lambda s, d: moved_stats.append(d) or s)

    def visit(i, _block, _inputs, _outputs, _stats):
        rec.events.append(("visit", str(i)))
        return i == 1  # block 1 changed: it is moved again (visit may put CPU tensors in it) and rerun

    def watch(_i, block):
        return {"down_proj": llama.linears(block)["down_proj"]}

    ids = torch.randint(0, 64, (4, 8))
    capture.for_each_block(model, llama.blocks(model), ids, visit, watch, batch_size=2, device=CUDA0)
    want = [("to", "hidden->cuda:0")]
    for i in range(3):
        want += [("move", f"block{i}->cuda:0"), ("to", "kwargs->cuda:0"), ("visit", str(i))]
        want += [("move", "block1->cuda:0")] if i == 1 else []
        want += [("move", f"block{i}->cpu")]
    assert rec.events == want
    assert moved_stats == [dev.CPU] * 3  # one watched linear per block, its stats back on the CPU after visit


def test_for_each_block_moves_the_block_back_when_visit_raises(monkeypatch, tiny_llama):
    model = _model(tiny_llama)
    rec = _Recorder(model)
    monkeypatch.setattr(capture, "move", rec.move)
    monkeypatch.setattr(capture, "to_device", rec.to_device)

    def visit(i, *_):
        raise RuntimeError("visit failed")

    with pytest.raises(RuntimeError, match="visit failed"):
        capture.for_each_block(model, llama.blocks(model), torch.randint(0, 64, (2, 8)), visit, device=CUDA0)
    assert rec.events[-1] == ("move", "block0->cpu")


def test_stats_follow_their_inputs_device_and_move_in_place():
    s = capture.LinearStats(want_xtx=True)
    s.add(torch.randn(3, 5, 4))
    assert s.total is not None and s.xtx is not None
    assert s.total.device == s.xtx.device == dev.CPU
    assert s.to_(dev.CPU) is s and s.n == 15
    torch.testing.assert_close(s.mean, s.total / 15)


def test_cpu_device_is_the_same_computation(tiny_llama):
    """device=cpu (what auto resolves to here) changes nothing: a block's outputs in the engine are bit-identical to
    the model's own forward."""
    model = _model(tiny_llama)
    ids = torch.randint(0, 64, (2, 8))
    outs: list[torch.Tensor] = []
    capture.for_each_block(model, llama.blocks(model), ids, lambda i, b, x, y, s: outs.append(y[0]),
                           batch_size=2, device=dev.resolve("cpu"))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    assert torch.equal(outs[0], hidden[1])  # block 0's output is the model's first hidden state after it


def test_search_scorer_runs_every_block_and_the_head_on_the_device(monkeypatch, tiny_llama):
    """TailKL (the searches' whole-model KL) puts each block, then the final norm and lm_head, on the device for
    its turn and back; on the unchanged model the KL is zero."""
    import compress.search.scoring as scoring

    model = _model(tiny_llama)
    names = {id(b): f"block{i}" for i, b in enumerate(llama.blocks(model))}
    names |= {id(model.model.norm): "norm", id(model.lm_head): "lm_head"}
    events: list[str] = []
    real = dev.on_device

    def on_device(module, device):
        events.append(f"{names[id(module)]}->{device}")
        return real(module, dev.CPU)  # the maths stays on the CPU here

    monkeypatch.setattr(scoring, "on_device", on_device)
    monkeypatch.setattr(scoring, "to_device", lambda value, device: value)
    tail = scoring.TailKL(model, torch.randint(0, 300, (2, 16)), batch_size=2, any_start=False, device=CUDA0)
    one_pass = ["block0->cuda:0", "block1->cuda:0", "block2->cuda:0", "norm->cuda:0", "lm_head->cuda:0"]
    assert events == one_pass
    assert tail.kl_from(0) == pytest.approx(0.0, abs=1e-9)
    assert events == one_pass * 2
