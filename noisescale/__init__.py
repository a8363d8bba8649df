"""noisescale: measure the gradient noise scale of PyTorch training and choose the batch size from it."""

__version__ = "0.1.0"
