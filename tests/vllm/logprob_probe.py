"""Run stock vLLM once on a model and write its greedy tokens and top-k logprobs as JSON.

    python tests/vllm/logprob_probe.py OUT.json --model DIR [--tp 2] [--pp 1]
        [--load-format auto|sharded_state] [--max-tokens 16] [--logprobs 5]

The architecture matrix (test_arch_matrix.py) runs it in a subprocess for the source
model loaded normally and for the published shards loaded with ``sharded_state``, and
compares the two files exactly: on vLLM's CPU backend greedy decoding with logprobs is
bit-deterministic across runs (measured for every family of the matrix). It uses plain
``vllm.LLM`` with the CPU settings of DESIGN.md, independently of preshard's own engine
code, so the check does not share a bug with what it checks.

The prompts are fixed token ids (the tiny models have no tokenizer). Exit code 0 with the
JSON written, or non-zero with vLLM's error on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
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


def run(args: argparse.Namespace) -> dict:
    world = args.tp * args.pp
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _omp_bind(world))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vllm import LLM, SamplingParams

    kwargs = {
        "model": args.model,
        "tensor_parallel_size": args.tp,
        "pipeline_parallel_size": args.pp,
        "load_format": args.load_format,
        "skip_tokenizer_init": True,
        "seed": 0,
        "gpu_memory_utilization": 0.2,
        "enforce_eager": True,
        "max_num_seqs": 8,
        "max_model_len": 256,
    }
    if args.quantization:
        kwargs["quantization"] = args.quantization
    t0 = time.monotonic()
    llm = LLM(**kwargs)
    t1 = time.monotonic()
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=args.logprobs
    )
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in PROMPTS], params, use_tqdm=False)
    t2 = time.monotonic()
    seqs = []
    for o in outs:
        c = o.outputs[0]
        positions = []
        for pos in c.logprobs or []:
            # Sorted by token id: the comparison must not depend on dict order.
            positions.append([[int(t), float(lp.logprob)] for t, lp in sorted(pos.items())])
        seqs.append({"tokens": [int(t) for t in c.token_ids], "logprobs": positions})
    # Stop vLLM's engine core and workers before this process exits (os._exit below
    # would otherwise orphan them).
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    return {
        "model": args.model,
        "tp": args.tp,
        "pp": args.pp,
        "load_format": args.load_format,
        "load_seconds": t1 - t0,
        "generate_seconds": t2 - t1,
        "sequences": seqs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--logprobs", type=int, default=5)
    a = ap.parse_args(argv)
    result = run(a)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    # vLLM's engine processes can keep the interpreter alive at exit; the result is out:
    # stop every process this one started, then leave.
    _stop_children()
    sys.stdout.flush()
    os._exit(0)


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
