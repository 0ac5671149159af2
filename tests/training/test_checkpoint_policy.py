"""trainer.save_checkpoints: the default keeps last.ckpt only, and a value outside last | best | none is refused when
the config is composed."""

from __future__ import annotations

import pytest

from tests.helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_default_keeps_one_file_per_job():
    assert compose_config().trainer.save_checkpoints.value == "last"


def test_a_value_outside_the_choices_is_refused_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["trainer.save_checkpoints=all"])
    message = f"{error.value} {error.value.__cause__}"
    assert "trainer.save_checkpoints=all" in message and "expected one of [last, best, none]" in message
