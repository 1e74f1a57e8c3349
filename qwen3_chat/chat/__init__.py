"""Conversations: tokenizer and chat template (MLX-free) and `ChatSession` (state, cache reuse)."""
