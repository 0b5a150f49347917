"""Data loading for SFT: formats, mixtures, held-out split, length policy, synthetic tasks."""
