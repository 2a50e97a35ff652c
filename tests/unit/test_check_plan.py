"""The run's last check before export: the plan's per-layer widths are the model's; a mismatch is a named
CompressError (exit 1) saying which count or layer differs, never a bare zip() ValueError."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.errors import CompressError
from compress.models import llama
from compress.pipeline import _check_plan
from compress.plan import Plan
from tests.tiny import tiny_config


@pytest.fixture
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama"))  # 3 layers


def test_matching_plan_passes(model):
    _check_plan(Plan.of(model), model)


def test_a_block_the_plan_does_not_have_is_named(model):
    plan = Plan.of(model)
    del plan.blocks[2]
    with pytest.raises(CompressError, match=r"^the plan has 2 layers, the model 3; a pass removed or added a block"):
        _check_plan(plan, model)


def test_a_block_removed_from_the_model_is_named(model):
    plan = Plan.of(model)
    del llama.blocks(model)[0]
    with pytest.raises(CompressError, match=r"^the plan has 3 layers, the model 2;"):
        _check_plan(plan, model)


def test_a_width_the_plan_did_not_record_is_named(model):
    plan = Plan.of(model)
    planned = plan.blocks[1].widths
    plan.blocks[1].widths = dataclasses.replace(planned, intermediate_size=planned.intermediate_size - 8)
    with pytest.raises(CompressError, match=r"^layer 1: the plan says .*a pass did not record what it cut"):
        _check_plan(plan, model)
