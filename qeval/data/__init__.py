"""Synthetic text qeval generates itself: passkey prompts and the toy model's corpus."""
