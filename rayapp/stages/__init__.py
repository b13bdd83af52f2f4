"""The pipeline's stages, one package each, in pipeline order (see rayapp/pipeline.py)."""
