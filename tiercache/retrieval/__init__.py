"""Block retrieval: summaries, indexes, the per-step selector and the prefetch predictor."""
