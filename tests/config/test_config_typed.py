"""The config is typed once, by the schema: StrEnum choices that modules use as strings, error messages that show
them as typed, and optimizer state that holds plain values (checkpoints load with ``weights_only``)."""

from __future__ import annotations

import enum
import io

import pytest
import torch

from kimi_lab.config import schema, validate_config
from kimi_lab.config.validate import ConfigError
from kimi_lab.model import build_model
from kimi_lab.optim import build_optimizer, build_scheduler
from tests.helpers import compose_config

SCHEMA_ENUMS = [obj for obj in vars(schema).values()
                if isinstance(obj, type) and issubclass(obj, enum.Enum) and obj.__module__ == schema.__name__]


@pytest.mark.parametrize("choice", SCHEMA_ENUMS, ids=lambda c: c.__name__)
def test_every_schema_choice_is_a_str_enum_named_by_its_value(choice):
    """Registries keyed by strings, f-strings and overrides.yaml spellings (the member name) all read the value."""
    assert issubclass(choice, enum.StrEnum)
    for member in choice:
        assert member.name == member.value == f"{member}" and {member.value: 1}.get(member) == 1


def test_composed_values_carry_the_schema_types():
    cfg = compose_config(["optimizer.lr=1", "rope=yarn", "moe=deepseek_v3"])
    assert type(cfg.optimizer.lr) is float and type(cfg.moe.n_routed_experts) is int
    assert cfg.rope.scaling.type == "yarn" and isinstance(cfg.moe.topk_method, schema.TopkMethod)


def test_error_messages_show_enum_values_as_typed():
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(["eval=downstream", "eval.tasks=[piqa,piqa]"]))
    assert str(err.value).startswith("Invalid config: eval.tasks=['piqa', 'piqa']; allowed:")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_state_loads_weights_only(optimizer):
    """Param groups are pickled into checkpoints: an enum there would make torch.load(weights_only=True) refuse."""
    torch.manual_seed(0)
    cfg = compose_config([f"optimizer={optimizer}"])
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.optimizer)
    sched = build_scheduler(opt, cfg.optimizer, max_steps=4)
    model(torch.randint(0, 64, (1, 8))).logits.sum().backward()
    opt.step()
    sched.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert len(loaded["optimizer"]["param_groups"]) == len(opt.state_dict()["param_groups"])
