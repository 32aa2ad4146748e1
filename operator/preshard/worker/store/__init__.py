"""Where the worker's bytes live and how they move: ``s3`` (the one S3 client factory,
its settings, and the one translation of botocore's errors into preshard's), ``transfer``
(retries, sha256, the ``Uploader``), ``download`` (the ``Downloader``), ``records`` (the
records at a prefix: manifest, publication record, the ownership rules and the one
conditional ``put_manifest``), ``publication`` (begin, upload, commit the manifest last),
and the sources: ``source_files`` (local/PVC checks, the one S3 source listing, the
content pin), ``fetch`` (a source to local disk) and ``hf`` (huggingface_hub)."""
