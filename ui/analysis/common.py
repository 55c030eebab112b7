"""What every Analysis view shares: the side-by-side layout, chart drawing, widget memory, glossary."""

from __future__ import annotations

from typing import Any

import streamlit as st

from ui import charts
from ui.analysis.data import RunData, missing_message

HELP = {
    "cka": "CKA (centered kernel alignment) measures how similar two layers' representations of the same images are, "
           "from 0 (unrelated) to 1 (the same up to rotation and scale). It compares layers of different widths, "
           "so a teacher layer can be compared with a student layer.",
    "prototype": "A class prototype is the mean embedding (the penultimate-layer feature vector) of the images of "
                 "one class: the 'centre' of that class in the model's feature space.",
    "ncm": "NCM (nearest class mean) accuracy: classify each image by the closest prototype instead of the final "
           "layer. High NCM accuracy = classes form tight, well-separated clusters.",
    "ece": "ECE (expected calibration error): the average gap between how confident the model is and how often it "
           "is right, over confidence bins. 0 % = perfectly calibrated.",
    "spearman": "Spearman rank correlation between the teacher's and the student's attribution maps of the same image: "
                "+1 = same ranking of important pixels, 0 = unrelated, −1 = opposite.",
    "iou": "Top-k IoU: take the most important k % pixels of each map and measure the overlap (intersection over "
           "union). Two random maps overlap by about k/(200−k) — shown as the reference.",
    "norm": "Mean length (L2 norm) of the embedding vectors. The ND paper (ECCV 2024) observed that distilled "
            "students have smaller feature norms than their teachers; a ratio below 1 shows it.",
    "spread": "Average distance of an image's embedding to its class prototype, relative to the embedding norm: "
              "lower = tighter classes.",
    "cos": "Average cosine similarity between an image's embedding and its class prototype: 1 = every image points "
           "exactly in its class direction.",
}
TABS = {  # view -> tab label
    "cka": ":material/layers: Layer similarity (CKA)",
    "prototypes": ":material/scatter_plot: Prototypes & embeddings",
    "attribution": ":material/image_search: Attribution maps",
    "agreement": ":material/handshake: Agreement & calibration",
    "explorer": ":material/search: Disagreement explorer",
}
TAB_KEY = "an_tab"
SELECTION_KEY = "an_sel_{run}"  # the images lasso-selected on the embeddings of a run, read by the explorer
EXPLORER_SOURCE_KEY = "an_{side}_exp_source"


def side_by_side(datas: list[RunData], render) -> None:
    """Call ``render(data, side, compact)`` for one run, or for two runs in two columns."""
    if len(datas) == 1:
        render(datas[0], "a", False)
        return
    cols = st.columns(2, gap="large")
    for col, data, side in zip(cols, datas, ("a", "b")):
        with col:
            st.markdown(f"### {data.label}")
            render(data, side, True)


def plot(fig, name: str, key: str, **kw) -> Any:
    return st.plotly_chart(fig, config=charts.plotly_config(name), key=key, **kw)


def restore(key: str, default: Any, options: Any = None) -> Any:
    """Widgets in a closed tab are not drawn, and Streamlit then forgets their value. Bring back the value
    remembered by ``keep`` (if still valid) and return the default to pass to the widget: None when the value
    comes from Session State (passing both makes Streamlit warn)."""
    memo = st.session_state.get("_an_keep", {})
    if key not in st.session_state and key in memo:
        value = memo[key]
        valid = options is None or (all(v in options for v in value) if isinstance(value, list) else value in options)
        if valid:
            st.session_state[key] = value
    return None if key in st.session_state else default


def keep(key: str, value: Any) -> Any:
    st.session_state.setdefault("_an_keep", {})[key] = value
    return value


def need_analysis(data: RunData, tensors: bool = True) -> bool:
    """True when the end-of-run analysis (with its tensors, unless ``tensors`` is False) can be shown; else say why."""
    if data.complete and (not tensors or data.tensors):
        return True
    st.info(data.error or missing_message(data))
    return False
