"""Operating Corral: metrics, logs, traces, Flower, the backing services."""
