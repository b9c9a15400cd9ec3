"""Automated interpretability (Bills et al. 2023): explain, simulate and score features and neurons
with any OpenAI-compatible endpoint. See ``pipeline.run_dictionary`` and ``compare.compare_dictionaries_step``."""
