"""medfoundation: a medical segmentation foundation model served and improved inside MONAI Label.

Layers (data flows one way: request -> adapter -> engine -> mask -> adapter -> response):
  lib.model    the foundation model: named builders, checkpoint resolution and verification
  lib.engine   pure torch/numpy, never imports monailabel: preprocessing, embedding cache, predictor, prompting
  lib.infers   thin MONAI Label adapters over lib.engine
"""
