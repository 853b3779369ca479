"""Deploying the federation on Kubernetes: provisioning kits into Secrets, the pod
entrypoint of a participant, the in-cluster check `helm test` runs, and `fedllm logs`."""
