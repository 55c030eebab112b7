"""Shared Streamlit helpers of the Distillery dashboard (state, forms, badges, charts)."""
