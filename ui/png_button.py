"""A visible "Download PNG" button for a Plotly chart, next to the camera icon that only shows on hover.

The browser exports the chart exactly as drawn, through the chart's own camera button (so the file has the
size, scale and file name of ``charts.plotly_config``); nothing is rendered a second time on the server.
"""

from __future__ import annotations

import streamlit as st

_HTML = '<button type="button" class="png-button">Download PNG</button>'
_CSS = """
.png-button {
  font: inherit; font-size: 0.875rem; padding: 0.25rem 0.75rem; min-height: 2.5rem; cursor: pointer;
  color: var(--st-text-color); background: var(--st-background-color);
  border: 1px solid var(--st-border-color, rgba(49, 51, 63, 0.2)); border-radius: 0.5rem;
}
.png-button:hover { border-color: var(--st-primary-color); color: var(--st-primary-color); }
"""
_JS = """
export default function ({ parentElement, data }) {
  parentElement.querySelector("button").onclick = () => {
    const chart = document.querySelector(`.st-key-${data.chart}`);
    const camera = chart && chart.querySelector('.modebar-btn[data-title="Download plot as a PNG"]');
    if (camera) camera.click();
  };
}
"""
_component = st.components.v2.component("distillery_png_button", html=_HTML, css=_CSS, js=_JS)


def png_button(chart_key: str) -> None:
    """Draw the button for the ``st.plotly_chart`` drawn with ``key=chart_key`` on this page."""
    _component(key=f"png_{chart_key}", data={"chart": chart_key}, width="content")
