"""Captions to conditioning: caption transforms, tokenizer, text encoding, trained embeddings, tag counts."""
