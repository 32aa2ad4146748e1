"""The vLLM engine, as the conversion uses it: ``process`` runs one engine in a child
process group (load, optionally saving each rank's raw weights, generate the reference
outputs), with ``cpu``'s settings on vLLM's CPU backend; ``raw_loader`` is the
``preshard_raw`` model loader that saves the raw weights, registered in every vLLM
process by ``plugin`` (the ``vllm.general_plugins`` entry point); ``load_trace``
records what vLLM's weight loaders write (the conversion's sharding metadata, and the
engine-free planner's plan); ``kernels`` probes whether this machine's vLLM has a
quantization's kernel; ``installed`` says which vLLM this is, without importing it."""
