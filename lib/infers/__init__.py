"""MONAI Label adapters: infer tasks over lib.engine."""
