"""lkjax: train speculative-decoding drafts with LK losses (Samarin et al., arXiv 2602.23881) in JAX."""

__version__ = "0.1.0"
