"""The conversion pipeline: ``engine_path`` (Downloading -> Converting with a vLLM engine
-> Verifying -> Uploading), what both paths share (``common``: the request, the work dir,
the source's config, the quantization the engine loads with), and the result's
verification record (``result``). The engine-free path is ``preshard.worker.enginefree``
(``common`` hands it over when the planner plans the model)."""
