"""Gateway tests: the image reader, security, logs, heatmaps (no inference service needed)."""
