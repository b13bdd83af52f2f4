"""Checks of the cluster configs (cluster/): launcher YAMLs, KubeRay manifests, and whether a run
config's stages can be placed on their node types. `rayapp check-cluster` runs them."""
