"""SeerAttention-R (arXiv 2506.08889): learned block-sparse decoding."""
