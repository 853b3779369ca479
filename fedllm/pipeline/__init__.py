"""What the Kubeflow pipeline's components call (``steps``, in a step's
``workspace``); submit mode's job submission to a running federation is
``fedllm.federation.submit``, beside the simulator. Compiling, running and
submitting the pipeline itself is the source tree's ``pipelines/`` (``python -m pipelines``); the library imports none
of it."""
