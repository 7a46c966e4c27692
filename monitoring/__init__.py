"""Monitoring: the prediction log against the model's reference (Evidently), label-free performance estimates,
alerts, and the retraining loop."""
