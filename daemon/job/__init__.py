"""The job layer: one lifecycle (states and allowed transitions) and one conversation with
IPQS per job, shared by the daemon's stages and by ``submit``."""
