"""Training: evaluation and decision thresholds today; tuning, training, registry and promotion to come."""
