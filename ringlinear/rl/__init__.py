"""Reinforcement learning on the inference engine's rollouts, and the training–inference alignment probe."""
