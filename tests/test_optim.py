"""The learning-rate schedule and weight-decay mask."""

import numpy as np
import pytest

from jaxpeft.errors import JaxpeftError
from jaxpeft.optim import OptimConfig, decay_mask, make_schedule


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_schedule_is_linear_warmup_then_linear_decay(warmup):
    """transformers' get_linear_schedule_with_warmup, step by step (the run log reads the
    same optax schedule)."""
    cfg = OptimConfig(learning_rate=3e-4, total_steps=20, warmup_steps=warmup)
    schedule = make_schedule(cfg)
    for step in range(0, 22):
        expected = (3e-4 * step / warmup if step < warmup
                    else 3e-4 * max(0.0, (20 - step) / (20 - warmup)))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)
    if warmup:
        assert float(schedule(warmup)) == pytest.approx(3e-4)
    assert float(schedule(20)) == 0.0


def test_decay_mask_skips_bias_and_layernorm():
    params = {"bert": {"embeddings": {"LayerNorm": {"scale": np.ones(2), "bias": np.ones(2)},
                                      "word_embeddings": {"embedding": np.ones((3, 2))}},
                       "encoder": {"q": {"kernel": np.ones((2, 2)), "bias": np.ones(2),
                                         "lora_a": np.ones((2, 1)), "lora_b": np.ones((1, 2))}}}}
    m = decay_mask(params)
    assert m["bert"]["embeddings"]["LayerNorm"] == {"scale": False, "bias": False}
    assert m["bert"]["embeddings"]["word_embeddings"]["embedding"] is True
    assert m["bert"]["encoder"]["q"] == {"kernel": True, "bias": False, "lora_a": True,
                                         "lora_b": True}


@pytest.mark.parametrize("kwargs,msg", [
    ({"learning_rate": 0.0}, "learning rate must be > 0"),
    ({"learning_rate": -1e-3}, "learning rate must be > 0"),
    ({"total_steps": 0}, "total steps must be > 0"),
    ({"warmup_steps": 50}, "warmup steps must be in"),
    ({"weight_decay": -0.1}, "weight decay must be >= 0"),
])
def test_bad_optimizer_options(kwargs, msg):
    base = {"learning_rate": 1e-3, "total_steps": 10}
    with pytest.raises(JaxpeftError, match=msg):
        OptimConfig(**{**base, **kwargs})
