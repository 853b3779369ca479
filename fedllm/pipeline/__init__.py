"""The Kubeflow face of fedllm: what the pipeline's components call (``steps``),
compiling the pipeline (``build``), running it locally with kfp.local
(``local_run``) or on a cluster (``kubeflow_run``), and submit mode's job
submission to a running federation (``fedllm.federation.submit``, beside the simulator)."""
