"""Data: sources of documents, tokenizers, the token cache and the batch loader."""
