"""Datasets with known ground truth, for checking that SAEs find what is there."""
