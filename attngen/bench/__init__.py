"""`attngen bench`: attngen timed against its peers (PyTorch SDPA, FlexAttention), tile
sweeps, whole transformers models, and plots of the results."""
