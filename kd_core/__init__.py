"""Distillery's library: models, data, distillation losses, the training engine and analyses.

Importable without Streamlit or a database; the dashboard and the CLI are thin clients of it.
"""

__version__ = "0.1.0"
