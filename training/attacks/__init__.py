"""Adversarial attacks written for this project (PyTorch, batched): see :mod:`training.attacks.carlini`."""
