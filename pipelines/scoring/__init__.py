"""Scoring: the scorers, their answer extractors, the typed scores of R."""
