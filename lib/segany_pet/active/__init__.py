"""Active learning: which scan to annotate next, which label to re-check (cross-prompt disagreement)."""
