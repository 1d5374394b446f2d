"""What runs a job and keeps its state: the engine that wires the pipeline, the daemon and supervisor over
jobs, and the job's Redis state (lease, progress, dead letters, gaps, projection versions)."""
