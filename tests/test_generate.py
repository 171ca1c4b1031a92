"""`python -m smatch_jax.main.generate` on the real SmolLM2 port (slow: loads 135M weights)."""

import pytest

from smatch_jax import assets
from smatch_jax.errors import UserError
from smatch_jax.main import generate


@pytest.mark.slow
def test_generate_cli_smollm2_shows_backspaces(capsys):
    assets.fetch("smollm2")
    generate.main(
        [
            "--pretrained=smollm2",
            "--prompt",
            "The capital of France is",
            "--greedy",
            "--max_new_tokens",
            "4",
            "--max_actions",
            "6",
            "--bkspc_logit_bias",
            "40",
            "--show_actions",
        ]
    )
    out = capsys.readouterr().out
    # A huge bias makes greedy decoding alternate write / delete: the action stream shows
    # the deletions and the final text keeps only what survived.
    assert "backspaces)" in out and "actions:" in out and "⌫" in out
    assert "The capital of France is" in out


def test_generate_rejects_unknown_model():
    with pytest.raises(UserError, match="hf:<checkpoint dir>"):
        generate.load_pretrained("gpt5")
