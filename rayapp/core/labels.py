"""The label value that marks a token as not scored (prompt tokens, padding): PyTorch's
cross-entropy ``ignore_index`` default, as HF and the paper's code use."""

IGNORE_INDEX = -100
