"""Evaluation (ComfyUI-free): identity and prompt metrics for generated multi-ID portraits.

``python -m instantfamily_nodes.evaluate RUN_FOLDER`` scores a folder of generations (see ``inputs``);
the metrics themselves are in ``metrics`` (SingleSim, MultiSim, FastComposer's greedy-min) and need
nothing but numpy. Heavier parts (face backends, CLIP) are imported only when used.
"""
from .errors import EvaluationInputError
from .metrics import cosine_matrix, fastcomposer_score, greedy_match, mixing_term, multi_sim, single_sims

__all__ = ["EvaluationInputError", "cosine_matrix", "fastcomposer_score", "greedy_match", "mixing_term",
           "multi_sim", "single_sims"]
