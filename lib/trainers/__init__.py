"""MONAI Label train-task adapters and the retraining schedule."""
