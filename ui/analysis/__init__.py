"""The Analysis page's views, one module each (cka, prototypes with embeddings, attribution, agreement, explorer),
with what they share in ``data`` (lazy loading of a run's artifacts) and ``common`` (layout and widget memory)."""
