"""`make bench`: run every benchmark in one go and print their figures.

Benchmarks print ratios against baselines measured in the same run; they are not tests
and never fail on a number (they exit non-zero only if a benchmark cannot run).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ("operator scale: 200 and 1000 resources at once", "operator_scale.py"),
    ("S3 transfer: preshard vs naive boto3 vs s5cmd", "s3_transfer.py"),
    ("conversion wall time by stage (1.1 GiB model, TP=2)", "convert_stages.py"),
    ("verify --against: time and peak memory per GiB (1.1 GiB model)", "verify_against.py"),
    ("vLLM start-up: original vs preshard shards (local, S3 streaming), TP=2", "serving.py"),
    (
        "engine-free conversion vs the engine, cp and s5cmd (1.5 and 4 GiB models, TP=2)",
        "engine_free.py",
    ),
]


def main() -> int:
    only = set(sys.argv[1:])
    failed = []
    for title, script in BENCHES:
        if only and script.removesuffix(".py") not in only:
            continue
        print(f"\n=== {title} ({script}) ===", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / script)])
        if rc != 0:
            failed.append(script)
    if failed:
        print(f"\nbenchmarks that could not run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
