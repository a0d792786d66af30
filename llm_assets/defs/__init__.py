"""The Dagster side: the stages multi-asset, the job, sensors, checks."""
