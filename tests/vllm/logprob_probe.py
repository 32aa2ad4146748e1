"""Run stock vLLM on models and write their greedy tokens and top-k logprobs as JSON.

    python tests/vllm/logprob_probe.py OUT.json=MODEL_DIR[@LOAD_FORMAT[:QUANTIZATION]] ...
        [--tp 2] [--pp 1] [--max-tokens 16] [--logprobs 5]

Each job loads one engine (load format ``auto`` unless given, e.g. ``@sharded_state``;
``@auto:fp8_per_block``: the source with vLLM's online method),
generates, writes OUT.json and shuts the engine down before the next job: one process
for several models saves vLLM's import and start-up per model.

The architecture matrix (test_arch_matrix.py) runs it in a subprocess for the source
model loaded normally and for the published shards loaded with ``sharded_state``, and
compares the two files: the same greedy tokens, the top-5 logprobs within preshard's
tolerance (two engines over the same bits were bit-identical on one CPU and differed by
1e-5 on another). It uses plain ``vllm.LLM`` with the CPU settings of docs/cpu-conversion.md,
independently of preshard's own engine code, so the check does not share a bug with what
it checks.

The prompts are fixed token ids (the tiny models have no tokenizer). Exit code 0 with the
JSON written, or non-zero with vLLM's error on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time

# Token-id prompts within every tiny model's vocabulary (>= 500).
PROMPTS = (
    (3, 4, 5, 6, 7, 8, 9, 10),
    (103, 203, 303, 403),
    (14, 16, 20, 22, 26, 32),
    (450, 12, 77, 3, 301),
)


def _omp_bind(world: int) -> str:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    if len(cpus) < world:
        return "|".join(str(cpus[r % len(cpus)]) for r in range(world))
    per = len(cpus) // world
    return "|".join(",".join(map(str, cpus[r * per : (r + 1) * per])) for r in range(world))


def run_one(args: argparse.Namespace, model: str, load_format: str) -> dict:
    from vllm import LLM, SamplingParams

    load_format, _, quantization = load_format.partition(":")

    kwargs = {
        "model": model,
        "tensor_parallel_size": args.tp,
        "pipeline_parallel_size": args.pp,
        "load_format": load_format,
        "skip_tokenizer_init": True,
        "seed": 0,
        "gpu_memory_utilization": 0.2,
        "enforce_eager": True,
        "max_num_seqs": 8,
        "max_model_len": 256,
    }
    if quantization:
        kwargs["quantization"] = quantization
    t0 = time.monotonic()
    llm = LLM(**kwargs)
    t1 = time.monotonic()
    seqs = []
    if args.max_tokens > 0:
        params = SamplingParams(
            temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=args.logprobs
        )
        prompts = [{"prompt_token_ids": list(p)} for p in PROMPTS]
        for o in llm.generate(prompts, params, use_tqdm=False):
            c = o.outputs[0]
            positions = []
            for pos in c.logprobs or []:
                # Sorted by token id: the comparison must not depend on dict order.
                positions.append([[int(t), float(lp.logprob)] for t, lp in sorted(pos.items())])
            seqs.append({"tokens": [int(t) for t in c.token_ids], "logprobs": positions})
    t2 = time.monotonic()
    # Stop vLLM's engine core and workers before the next engine (or the exit).
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return {
        "model": model,
        "tp": args.tp,
        "pp": args.pp,
        "load_format": load_format,
        "quantization": quantization or None,
        "load_seconds": t1 - t0,
        "generate_seconds": t2 - t1,
        "sequences": seqs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "jobs",
        nargs="+",
        metavar="OUT=MODEL[@LOAD_FORMAT]",
        help="write the result for MODEL (load format auto unless given) to OUT",
    )
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=16, help="0: load only")
    ap.add_argument("--logprobs", type=int, default=5)
    ap.add_argument("--model", help="single-job form: OUT --model MODEL [--load-format F]")
    ap.add_argument("--load-format", default="auto")
    a = ap.parse_args(argv)
    jobs = []
    if a.model:
        if len(a.jobs) != 1:
            ap.error("--model takes exactly one OUT")
        a.jobs = [f"{a.jobs[0]}={a.model}@{a.load_format}"]
    for spec in a.jobs:
        out, sep, rest = spec.partition("=")
        if not sep:
            ap.error(f"{spec!r} is not OUT=MODEL[@LOAD_FORMAT]")
        model, _, load_format = rest.partition("@")
        jobs.append((out, model, load_format or "auto"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _omp_bind(a.tp * a.pp))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The engine core in this process: every prompt is queued before the first step, so
    # the reference and the reload run the same batches (no race over the engine core's
    # socket; preshard's engine does the same, engine.process.ENV_V1_MULTIPROCESSING).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    rc = 0
    for out, model, load_format in jobs:
        try:
            result = run_one(a, model, load_format)
        except Exception as exc:
            print(
                f"probe: {model} ({load_format}) failed: {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
            rc = 1
            _stop_children()
            continue
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    # vLLM's engine processes can keep the interpreter alive at exit; the results are
    # out: stop every process this one started, then leave.
    _stop_children()
    sys.stdout.flush()
    os._exit(rc)


def _stop_children() -> None:
    import psutil

    children = psutil.Process().children(recursive=True)
    for c in children:
        with contextlib.suppress(psutil.Error):
            c.terminate()
    _, alive = psutil.wait_procs(children, timeout=10)
    for c in alive:
        with contextlib.suppress(psutil.Error):
            c.kill()


if __name__ == "__main__":
    sys.exit(main())
