"""Recformer's model family in Hugging Face's layout: configuration, attention, modeling, tokenization, conversion."""
