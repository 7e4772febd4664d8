"""Evaluation: roofline estimates, measured latency, and the other evaluators. No heavy imports here."""
