"""hias_nb: HIAST (hard-aware instance adaptive self-training) for UDA semantic segmentation.

Paper: Zhu et al., "Hard-aware Instance Adaptive Self-training for Unsupervised Cross-domain Semantic
Segmentation", TPAMI 2025 (arXiv 2302.06992), extending IAST (Mei et al., ECCV 2020).
"""

__version__ = "0.1.0"
