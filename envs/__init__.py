"""Benchmark environments, installed as rlplastic.envs."""
