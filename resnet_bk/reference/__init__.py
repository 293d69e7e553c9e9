"""Pure-PyTorch references of the fast ops (the specification each kernel is tested against)."""
