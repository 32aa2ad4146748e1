"""What ``spec.converter.env`` may set (pure): an allowlist of names, within it a refusal
of names that load code or redirect where code, data or logs come from, and the names
the operator's Jobs set themselves. The CRD carries the same rules (its pattern and CEL
rule are built here; unit tests compare them with crds/); docs/security.md,
"Environment", is the reasoning.
"""

from __future__ import annotations

import re

# spec.converter.env may set only these (an allowlist: every other name could redirect
# credentials, endpoints, the Python path or preloaded libraries, e.g. AWS_*, HF_ENDPOINT,
# LD_PRELOAD, PYTHONPATH, PRESHARD_*); README and the CRD description list them.
ALLOWED_ENV_PREFIXES: tuple[str, ...] = (
    "VLLM_",
    "NCCL_",
    "OMP_",
    "MKL_",
    "KMP_",
    "TORCH_",
    "TORCHINDUCTOR_",
    "PYTORCH_",
    "CUDA_",
)
ALLOWED_ENV_NAMES: tuple[str, ...] = (
    "HF_HUB_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "HF_HUB_DISABLE_PROGRESS_BARS",
    "HF_HUB_ENABLE_HF_TRANSFER",
    "HF_HUB_ETAG_TIMEOUT",
    "HF_HUB_DOWNLOAD_TIMEOUT",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    # worker tuning knobs (docs/architecture.md) and botocore's retries
    "PRESHARD_S3_CONCURRENCY",
    "PRESHARD_ENGINE_TIMEOUT",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)
ENV_NAME_PATTERN = (
    "^(("
    + "|".join(p.rstrip("_") for p in ALLOWED_ENV_PREFIXES)
    + ")_[A-Z0-9_]+|"
    + "|".join(ALLOWED_ENV_NAMES)
    + ")$"
)
# Within those families, names that load code or redirect where code, data or logs come
# from are refused (docs/security.md, "Environment"): a conversion pod that ran code of
# the tenant's choosing could forge its result. A name is refused when one of its
# ``_``-separated words is in DENIED_ENV_WORDS (paths, directories, files, caches,
# plugins, libraries, hooks, endpoints: e.g. VLLM_LOGGING_CONFIG_PATH, VLLM_PLUGINS,
# NCCL_NET_PLUGIN, TORCHINDUCTOR_CACHE_DIR, TORCH_HOME, OMP_TOOL_LIBRARIES,
# TORCHINDUCTOR_REDIS_HOST), or it is one of DENIED_ENV_NAMES (switches that load
# code or change what is loaded without such a word), unless it is one of
# ENV_DENY_EXCEPTIONS. Reviewed against vllm/envs.py (0.32) and torch 2.13's sources.
DENIED_ENV_WORDS: tuple[str, ...] = (
    # a location: what is read from there can be code (caches of compiled kernels,
    # extensions, hub code, logging configs) or what is written there can be a result
    "PATH",
    "PATHS",
    "LOGPATH",
    "PYTHONPATH",
    "DIR",
    "DIRS",
    "DIRECTORY",
    "FOLDER",
    "FILE",
    "FILES",
    "FILENAME",
    "ROOT",
    "HOME",
    "CACHE",
    "ZOO",
    "OUT",
    "OUTPUT",
    "TRACE",
    # code: plugins, shared libraries, modules, compilers, hooks, callables
    "PLUGIN",
    "PLUGINS",
    "LIB",
    "LIBS",
    "LIBRARY",
    "LIBRARIES",
    "SO",
    "INCLUDE",
    "MODULE",
    "MODULES",
    "BINARY",
    "NVCC",
    "INSTALL",
    "AUTOLOAD",
    "HOOK",
    "FN",
    "TOOL",
    "CMD",
    "COMMAND",
    "SCRIPT",
    "CONFIG",
    "OVERRIDE",
    "PGO",
    # elsewhere on the network: compiled code from a remote cache, rendezvous, usage data
    "URL",
    "URI",
    "HOST",
    "IP",
    "ADDR",
    "ADDRESS",
    "ENDPOINT",
    "SERVER",
    "REDIS",
    "REMOTE",
    "REPO",
)
DENIED_ENV_NAMES: tuple[str, ...] = (
    "VLLM_LOGGING_STREAM",  # an ext://module.attribute that logging.config imports
    "VLLM_ALLOW_INSECURE_SERIALIZATION",  # pickle between vLLM's processes
    "VLLM_USE_MODELSCOPE",  # downloads the model from ModelScope instead
    "VLLM_TEST_FORCE_LOAD_FORMAT",  # another load format (e.g. random "dummy" weights)
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD",  # torch.load unpickles arbitrary objects
    "TORCH_USE_RTLD_GLOBAL",  # how torch's shared libraries are loaded
    "TORCH_COMPILE_BACKEND",  # another torch.compile backend
    "NCCL_COMM_ID",  # NCCL's bootstrap address (another host)
    "TORCH_HUB",  # torch.hub's directory (hubconf.py is code); HF_HUB_* names are fine
)
# Names with a refused word that neither load code nor name a location.
ENV_DENY_EXCEPTIONS: tuple[str, ...] = (
    "CUDA_MODULE_LOADING",
    "CUDA_MODULE_DATA_LOADING",
    "VLLM_KV_CACHE_LAYOUT",
)
ENV_DENY_PATTERN = (
    "^(" + "|".join(DENIED_ENV_NAMES) + ")$|(^|_)(" + "|".join(DENIED_ENV_WORDS) + ")(_|$)"
)
# The CRD's CEL rule on spec.converter.env (a unit test compares it with crds/).
ENV_DENY_RULE = (
    f"self.all(e, !e.name.matches('{ENV_DENY_PATTERN}') || e.name in ["
    + ", ".join(f"'{n}'" for n in ENV_DENY_EXCEPTIONS)
    + "])"
)
ENV_DENY_MESSAGE = (
    "spec.converter.env may not set a variable that loads code or names a path, cache, "
    "plugin, library, hook or endpoint (e.g. VLLM_LOGGING_CONFIG_PATH, VLLM_PLUGINS, "
    "NCCL_NET_PLUGIN, TORCHINDUCTOR_CACHE_DIR): see docs/security.md"
)
_ENV_DENY_RE = re.compile(ENV_DENY_PATTERN)
_ENV_NAME_RE = re.compile(ENV_NAME_PATTERN)

# Variables the conversion Job sets itself (preshard.core.children; a unit test checks the
# list covers every name the builders write). converter.env may not set them: credentials
# come from credentialsSecret (never a plain value), endpoints and regions from
# spec.source/spec.output, and the paths from the operator.
RESERVED_ENV: frozenset[str] = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
        "HF_TOKEN",
        "PRESHARD_SOURCE_AWS_ACCESS_KEY_ID",
        "PRESHARD_SOURCE_AWS_SECRET_ACCESS_KEY",
        "PRESHARD_SOURCE_AWS_SESSION_TOKEN",
        "PRESHARD_SOURCE_ENDPOINT_URL",
        "PRESHARD_SOURCE_REGION",
        "PRESHARD_TERMINATION_LOG",
        "PRESHARD_WORK_DIR",
        "PRESHARD_PVC_MOUNT_ROOT",
        "HOME",
        "XDG_CACHE_HOME",
        "HF_HOME",
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
        "PYTHONUNBUFFERED",
        "PRESHARD_ACCELERATOR",
        "PRESHARD_MEMORY_LIMIT",
    }
)


def env_name(v: str) -> str:
    """``v`` when ``spec.converter.env`` may set it, else a ValueError saying why."""
    if v in RESERVED_ENV:
        raise ValueError(
            f"{v} is set by the operator and cannot be overridden (credentials come from "
            "credentialsSecret, endpoints and regions from spec.source and spec.output)"
        )
    if not _ENV_NAME_RE.match(v):
        raise ValueError(
            f"{v!r} may not be set (allowed: "
            + ", ".join(p + "*" for p in ALLOWED_ENV_PREFIXES)
            + " and a few exact names the CRD lists, such as HF_HUB_OFFLINE or "
            "PRESHARD_S3_CONCURRENCY; credentials, endpoints and paths are the operator's)"
        )
    refused = env_refusal(v)
    if refused:
        raise ValueError(f"{v} may not be set: {refused} (see docs/security.md, Environment)")
    return v


def env_refusal(name: str) -> str | None:
    """Why an otherwise allowed env name is refused (it loads code or redirects where
    code, data or logs come from), or None."""
    if name in ENV_DENY_EXCEPTIONS or not _ENV_DENY_RE.search(name):
        return None
    if name in DENIED_ENV_NAMES:
        return "it changes what the converter loads or runs"
    words = [w for w in name.split("_") if w in DENIED_ENV_WORDS]
    return (
        f"its word {words[0]} marks a variable that loads code or names a path, cache, "
        "plugin, library, hook or endpoint"
    )
