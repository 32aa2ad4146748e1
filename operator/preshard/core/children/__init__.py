"""The child objects a ShardedCheckpoint owns, as plain dicts (pure functions: same inputs,
same manifest, pinned by golden files in tests/golden). One module per thing built:

* :mod:`.conversion`: the conversion Job (``preshard convert``, the accelerator's
  resources and placement);
* :mod:`.steps`: the CPU-only step Jobs before a conversion (preflight, adopt, copy,
  withdraw; :mod:`preshard.core.steps` decides which one runs);
* :mod:`.purge`: the purge Job (deletionPolicy: Delete);
* :mod:`.configmap`: the serving ConfigMap (and ``status.serving``'s source);
* :mod:`.pod`: what every Job's pod is made of (metadata, restricted security contexts,
  the failure policy, the effective engine, accelerator and ServiceAccount);
* :mod:`.credentials`: the Secrets, endpoints and environment a pod reads storage with.

Names, labels and annotations are :mod:`preshard.core.naming`'s. User values only ever
land in an argument list or env values, never in a shell string.
"""
