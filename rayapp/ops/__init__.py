"""Operating a run: plan (memory, disk, cost), deploy (cluster checks), status, submit, rehearse."""
