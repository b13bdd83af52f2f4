"""Model and training code the stages share: loading, sharding, losses, the Ray Train worker."""
