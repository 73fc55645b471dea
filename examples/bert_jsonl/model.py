"""A small Hugging Face BERT classifier (``BertForSequenceClassification``): it returns its own loss."""

from __future__ import annotations

from transformers import BertConfig, BertForSequenceClassification


def bert(vocab_size: int = 212, num_labels: int = 2, num_hidden_layers: int = 2,
         hidden_size: int = 128, num_attention_heads: int = 4, max_position_embeddings: int = 64,
         dropout: float = 0.1) -> BertForSequenceClassification:
    """A freshly initialised BERT; ``vocab_size`` and ``num_labels`` come from the data set's hints."""
    config = BertConfig(vocab_size=vocab_size, num_labels=num_labels,
                        num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
                        num_attention_heads=num_attention_heads, intermediate_size=4 * hidden_size,
                        max_position_embeddings=max_position_embeddings, pad_token_id=0,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)
