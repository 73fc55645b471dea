"""A small Hugging Face GPT-2 (``GPT2LMHeadModel``): it returns its own loss when given ``labels``."""

from __future__ import annotations

from transformers import GPT2Config, GPT2LMHeadModel


def gpt2(vocab_size: int = 384, n_positions: int = 64, n_layer: int = 2, n_head: int = 4,
         n_embd: int = 64, dropout: float = 0.1) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2; ``vocab_size`` and ``n_positions`` come from the data set's hints."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_layer=n_layer,
                        n_head=n_head, n_embd=n_embd, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=dropout, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    # Transformers picks the loss by class name, and "GPT2LMHeadModel" names none: say it.
    model.loss_type = "ForCausalLM"
    return model
