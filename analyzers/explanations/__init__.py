"""Explanations and faithfulness: attributions, their scores, per-run explanations and embedding projections."""
