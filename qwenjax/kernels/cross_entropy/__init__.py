"""Cross-entropy of an LM head over hidden states, without materialising `[B, T, V]` logits."""

from qwenjax.kernels.cross_entropy.api import cross_entropy, token_nll

__all__ = ["cross_entropy", "token_nll"]
