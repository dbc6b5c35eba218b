"""rlplastic: a PyTorch testbed for studying and fixing loss of plasticity in deep RL."""

__version__ = "0.1.0"
