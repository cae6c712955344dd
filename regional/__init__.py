"""Regionally controllable sampling: region specs and region-aware cross-attention."""
