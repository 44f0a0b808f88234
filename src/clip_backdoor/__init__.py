"""clip-backdoor: backdoor attacks on CLIP pre-training and their cleaning."""

__version__ = "0.1.0"
