"""Supervised companion of the RL testbed: warm-start, continual and lifecycle studies with the same
interventions (rlplastic.interventions) and diagnostics (rlplastic.diagnostics)."""
