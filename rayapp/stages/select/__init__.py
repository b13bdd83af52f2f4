"""Stage 4, select: learning-percentage ranking and peer baselines -> selected shard + report."""
