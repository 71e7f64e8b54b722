"""Evaluation of a bundle against adversarial examples, through the gateway's defense core."""
