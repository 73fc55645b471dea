"""A Hugging Face GPT-2 causal LM on the built-in ``chars`` corpus, tokenized by a BPE trained on the fly."""
