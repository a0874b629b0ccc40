"""actgrad: how weight initialisation and BatchNorm shape activations, gradients and loss."""

__version__ = "0.1.0"
