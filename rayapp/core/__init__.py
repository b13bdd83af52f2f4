"""Pieces shared by every stage: storage, manifests, Ray start-up, progress lines."""
