"""Deployment tests: the Helm chart, its policies, the Dockerfiles and the container probe."""
