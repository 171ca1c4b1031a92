"""`make run` (the demo) runs end to end."""

import pytest

from smatch_jax.main import demo


@pytest.mark.slow
def test_demo_smoke(capsys):
    demo.main(["--steps", "30", "--warmup", "10", "--batch", "16"])
    out = capsys.readouterr().out
    assert "apply_backspaces -> P0 P1 A E eos" in out
    assert "held-out exact match" in out
    assert "step    29" in out
