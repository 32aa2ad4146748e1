"""Adopt, copy and refuse before any accelerator, end to end on the demo stack.

The stand-in worker (see conftest) plays ``preshard convert`` (what is under test here is
the operator's choice of step and the CPU-only steps, which run the REAL ``preshard preflight``,
``adopt``, ``copy`` and ``withdraw`` commands against ``rclone serve s3``). "Conversion
pod" below means a pod of a Job with component ``converter``: the only Jobs that request
an accelerator.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest

from preshard.core.manifest import MANIFEST_NAME
from preshard_dev.stack import LocalStack

from .conftest import (
    checkpoint_doc,
    conversion_history,
    ready_condition,
    seed_fake_source,
    wait_phase,
)

pytestmark = pytest.mark.e2e
NS = "default"
BUCKET = "preshard-checkpoints"


def pods_of(stack: LocalStack, component: str) -> list[dict[str, Any]]:
    assert stack.runner is not None
    jobs = {j["metadata"]["name"] for j in stack.jobs(NS, component)}
    return [h for h in stack.runner.history if h["job"] in jobs]


def conversion_pods(stack: LocalStack) -> list[str]:
    """Every pod of a conversion Job the runner ever ran."""
    return [h["job"] for h in conversion_history(stack)]


def manifest(stack: LocalStack, prefix: str) -> tuple[dict[str, Any], bytes]:
    body = stack.s3_client().get_object(Bucket=BUCKET, Key=prefix + MANIFEST_NAME)["Body"].read()
    return json.loads(body), body


def objects(stack: LocalStack, prefix: str) -> dict[str, bytes]:
    c = stack.s3_client()
    return {
        k[len(prefix) :]: c.get_object(Bucket=BUCKET, Key=k)["Body"].read()
        for k in stack.list_prefix(BUCKET, prefix)
        if not k.endswith(MANIFEST_NAME)
    }


def converted(stack: LocalStack, name: str) -> dict[str, Any]:
    stack.apply(checkpoint_doc(name), NS)
    st = wait_phase(stack, NS, name, ("Succeeded", "Failed"), 120)
    assert ready_condition(st).get("status") == "True", st
    assert st["path"] == "Converted" and st["identity"].startswith("sha256:")
    return st


def events_of(stack: LocalStack, name: str) -> list[tuple[str, str]]:
    return [
        (e.get("reason"), e.get("message"))
        for e in stack.events(NS)
        if (e.get("involvedObject") or {}).get("name") == name
    ]


def test_delete_and_reapply_adopts_without_a_conversion_pod(stack_factory: Any) -> None:
    stack: LocalStack = stack_factory()
    seed_fake_source(stack)
    first = converted(stack, "gitops")
    man, _ = manifest(stack, "gitops/")
    assert man["identity"] == first["identity"]
    assert man["owner"].endswith("/" + stack.checkpoint(NS, "gitops")["metadata"]["uid"])
    before = objects(stack, "gitops/")
    assert len(conversion_pods(stack)) == 1

    stack.delete_checkpoint(NS, "gitops")  # deletionPolicy Retain (default)
    stack.wait_for(lambda: stack.checkpoint(NS, "gitops") is None, 30, "deletion")
    t0 = time.monotonic()
    stack.apply(checkpoint_doc("gitops"), NS)
    st = wait_phase(stack, NS, "gitops", ("Succeeded", "Failed"), 30)
    took = time.monotonic() - t0
    print(f"re-applied resource Ready by adoption in {took:.1f} s")
    assert ready_condition(st)["status"] == "True", st
    assert ready_condition(st)["reason"] == "Adopted"
    assert st["path"] == "Adopted" and st["identity"] == first["identity"]
    assert took < 30
    assert len(conversion_pods(stack)) == 1  # still only the first resource's
    new_uid = stack.checkpoint(NS, "gitops")["metadata"]["uid"]
    man2, body2 = manifest(stack, "gitops/")
    assert man2["owner"] == f"{NS}/gitops/{new_uid}"  # rewritten, last
    assert {k: v for k, v in man2.items() if k != "owner"} == {
        k: v for k, v in man.items() if k != "owner"
    }
    assert st["artifact"]["manifestSha256"] == hashlib.sha256(body2).hexdigest()
    assert objects(stack, "gitops/") == before
    assert stack.configmap(NS, "gitops-serving") is not None
    assert any(r == "Adopted" for r, _ in events_of(stack, "gitops"))
    assert isinstance(st.get("durationSeconds"), int)


def test_same_identity_elsewhere_is_copied_not_converted(stack_factory: Any) -> None:
    stack: LocalStack = stack_factory()
    seed_fake_source(stack)
    t0 = time.monotonic()
    first = converted(stack, "orig")
    print(f"first resource Ready by (stand-in) conversion in {time.monotonic() - t0:.1f} s")
    t0 = time.monotonic()
    stack.apply(checkpoint_doc("twin"), NS)
    st = wait_phase(stack, NS, "twin", ("Succeeded", "Failed"), 60)
    print(f"second resource Ready by copy in {time.monotonic() - t0:.1f} s")
    assert ready_condition(st)["status"] == "True", st
    assert ready_condition(st)["reason"] == "Copied"
    assert st["path"] == "Copied" and st["identity"] == first["identity"]
    _, orig_body = manifest(stack, "orig/")
    assert st["origin"] == {
        "uri": "s3://preshard-checkpoints/orig/",
        "manifestSha256": hashlib.sha256(orig_body).hexdigest(),
    }
    assert len(conversion_pods(stack)) == 1
    assert objects(stack, "twin/") == objects(stack, "orig/")
    twin, twin_body = manifest(stack, "twin/")
    orig, _ = manifest(stack, "orig/")
    twin_uid = stack.checkpoint(NS, "twin")["metadata"]["uid"]
    assert twin["owner"] == f"{NS}/twin/{twin_uid}"
    assert twin["files"] == orig["files"] and twin["identity"] == orig["identity"]
    assert twin["extra"]["copiedFrom"]["uri"] == "s3://preshard-checkpoints/orig/"
    assert st["artifact"]["manifestSha256"] == hashlib.sha256(twin_body).hexdigest()
    # the real verify command agrees, object by object
    from .conftest import cli

    res = cli(stack, "verify", "s3://preshard-checkpoints/twin/")
    assert res.returncode == 0, res.stdout + res.stderr


def rank0_value(stack: LocalStack, prefix: str) -> float:
    import io

    from safetensors.numpy import load

    data = (
        stack.s3_client()
        .get_object(Bucket=BUCKET, Key=prefix + "model-rank-0-part-0.safetensors")["Body"]
        .read()
    )
    (tensor,) = load(io.BytesIO(data).read()).values()
    return float(tensor.reshape(-1)[0])


def test_a_ready_twin_of_another_namespace_is_never_offered_by_default(
    stack_factory: Any,
) -> None:
    """The copy policy's default is the own namespace only; nothing
    C sees names team-x's prefix, or that team-x holds this identity at all."""
    stack: LocalStack = stack_factory(namespaces=(NS, "team-x"))
    seed_fake_source(stack)
    doc = checkpoint_doc("x-llama")
    doc["spec"]["output"]["uri"] = f"s3://{BUCKET}/team-x-private/"
    stack.apply(doc, "team-x")
    x = wait_phase(stack, "team-x", "x-llama", ("Succeeded", "Failed"), 120)
    assert x["path"] == "Converted"
    c = converted(stack, "c-llama")  # Converted, not Copied
    assert c["identity"] == x["identity"]  # same store, same objects: one identity
    assert not stack.jobs(NS, "copy")
    seen = json.dumps([c, events_of(stack, "c-llama"), stack.jobs(NS, "converter")])
    assert "team-x" not in seen


def test_swapped_weights_of_a_trusted_namespace_are_not_copied(stack_factory: Any) -> None:
    """With a copy policy that trusts team-x: team-x's conversion
    published swapped weights under the genuine identity; C's copy is checked against C's
    own source (verify --against) and fails, so C converts: its rank-0 tensor holds C's
    values, and nothing of team-x's bytes stays at C's prefix."""
    stack: LocalStack = stack_factory(
        namespaces=(NS, "team-x"),
        operator_env={"PRESHARD_COPY_TRUST": json.dumps([[NS, "team-x"]])},
        runner_options={"base_env": {"PRESHARD_STANDIN_SWAP_NAMESPACE": "team-x"}},
    )
    seed_fake_source(stack)
    doc = checkpoint_doc("x-llama")
    doc["spec"]["output"]["uri"] = f"s3://{BUCKET}/team-x-swapped/"
    stack.apply(doc, "team-x")
    x = wait_phase(stack, "team-x", "x-llama", ("Succeeded", "Failed"), 120)
    assert x["path"] == "Converted" and rank0_value(stack, "team-x-swapped/") == 99.0
    c = converted(stack, "c-llama")
    assert c["identity"] == x["identity"]
    (copy_job,) = stack.jobs(NS, "copy")  # the copy was tried, with the check
    args = copy_job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--against") + 1] == "s3://preshard-models/tiny-llama/"
    warnings = [m for r, m in events_of(stack, "c-llama") if r == "CopyFailed"]
    assert len(warnings) == 1 and "VerificationFailed" in warnings[0]
    assert rank0_value(stack, "c-llama/") == 1.0  # C's own conversion, not X's bytes
    man, _ = manifest(stack, "c-llama/")
    assert "copiedFrom" not in (man.get("extra") or {})


def test_a_planted_checkpoint_is_neither_adopted_nor_trusted_for_deletion(
    stack_factory: Any,
) -> None:
    """Someone who could write a prefix before the resource existed
    planted a complete manifest claiming its identity (swapped weights, a gone owner,
    listing an unrelated object). The operator never saw it published: no Adopt; the
    Withdraw deletes the manifest alone; the resource converts and serves its own bytes."""
    import numpy as np
    from safetensors.numpy import save

    stack: LocalStack = stack_factory()
    seed_fake_source(stack)
    first = converted(stack, "genuine")
    man, _ = manifest(stack, "genuine/")
    c = stack.s3_client()
    for f in man["files"]:
        c.copy_object(Bucket=BUCKET, Key="planted/" + f["key"],
                      CopySource={"Bucket": BUCKET, "Key": "genuine/" + f["key"]})  # fmt: skip
    swapped = bytes(save({"model.layers.0.weight": np.full((64, 64), 99, dtype=np.float32)}))
    c.put_object(Bucket=BUCKET, Key="planted/model-rank-0-part-0.safetensors", Body=swapped)
    c.put_object(Bucket=BUCKET, Key="planted/victim.bin", Body=b"someone else's object")
    for f in man["files"]:
        if f["key"] == "model-rank-0-part-0.safetensors":
            f["size"], f["sha256"] = len(swapped), hashlib.sha256(swapped).hexdigest()
    man["files"].append({"key": "victim.bin", "size": 21,
                         "sha256": hashlib.sha256(b"someone else's object").hexdigest()})  # fmt: skip
    man["totalBytes"] = sum(f["size"] for f in man["files"])
    man["owner"] = f"{NS}/planted/00000000-dead-beef-0000-000000000000"  # gone
    c.put_object(Bucket=BUCKET, Key="planted/" + MANIFEST_NAME, Body=json.dumps(man).encode())
    assert rank0_value(stack, "planted/") == 99.0

    st = converted(stack, "planted")
    assert st["identity"] == first["identity"]  # the plant claimed the right identity
    assert not stack.jobs(NS, "adopt")
    (withdraw,) = stack.jobs(NS, "withdraw")
    assert "--delete-listed" not in withdraw["spec"]["template"]["spec"]["containers"][0]["args"]
    assert rank0_value(stack, "planted/") == 1.0  # its own conversion's values
    assert c.get_object(Bucket=BUCKET, Key="planted/victim.bin")["Body"].read() == (
        b"someone else's object"
    )
    uid = stack.checkpoint(NS, "planted")["metadata"]["uid"]
    assert manifest(stack, "planted/")[0]["owner"] == f"{NS}/planted/{uid}"


def test_living_foreign_owner_is_refused_before_any_conversion_job(stack_factory: Any) -> None:
    stack: LocalStack = stack_factory()
    seed_fake_source(stack)
    converted(stack, "alive")
    # someone copies alive's checkpoint (manifest included) to another prefix by hand
    c = stack.s3_client()
    for key in stack.list_prefix(BUCKET, "alive/"):
        c.copy_object(
            Bucket=BUCKET,
            Key="taken/" + key[len("alive/") :],
            CopySource={"Bucket": BUCKET, "Key": key},
        )
    stack.apply(
        checkpoint_doc(
            "taker",
            output={"uri": "s3://preshard-checkpoints/taken/", "credentialsSecret": "preshard-s3"},
        ),
        NS,
    )
    st = wait_phase(stack, NS, "taker", ("Failed",), 30)
    ready = ready_condition(st)
    assert ready["reason"] == "OutputOwnedByOther", st
    assert "default/alive" in ready["message"]  # same namespace: named
    assert not [
        j
        for j in stack.jobs(NS, "converter")
        if j["metadata"]["labels"]["preshard.io/checkpoint"] == "taker"
    ]
    assert not stack.jobs(NS, "adopt") and not stack.jobs(NS, "copy")
    man, _ = manifest(stack, "taken/")
    assert man["owner"].startswith(f"{NS}/alive/")  # untouched


def test_other_identity_of_a_gone_owner_is_replaced_by_a_conversion(stack_factory: Any) -> None:
    stack: LocalStack = stack_factory()
    seed_fake_source(stack)
    converted(stack, "old")
    old_man, _ = manifest(stack, "old/")
    stack.delete_checkpoint(NS, "old")
    stack.wait_for(lambda: stack.checkpoint(NS, "old") is None, 30, "deletion")
    # the same prefix, another conversion (TP 1 instead of 2): another identity
    stack.apply(checkpoint_doc("old", tp=1), NS)
    st = wait_phase(stack, NS, "old", ("Succeeded", "Failed"), 90)
    assert ready_condition(st)["status"] == "True", st
    assert st["path"] == "Converted" and st["identity"] != old_man["identity"]
    withdraw = stack.jobs(NS, "withdraw")
    assert len(withdraw) == 1  # the gone owner's manifest was withdrawn first
    assert len(conversion_pods(stack)) == 2
    new, _ = manifest(stack, "old/")
    assert new["identity"] == st["identity"] and new["tensorParallelSize"] == 1
    assert sorted(f["key"] for f in new["files"]) == sorted(objects(stack, "old/"))  # no stale


def test_the_operator_stays_within_its_rbac(stack_factory: Any) -> None:
    """Every call the operator made on the adopt and copy paths (owner lookups, step Job
    events) is allowed by REQUIRED_RBAC, which the chart renders."""
    import urllib.request

    from preshard.k8s.rbac import required_rbac

    # the stack's operator runs the metadata-only Secret existence check (the default)
    REQUIRED_RBAC = required_rbac(check_secrets=True)

    stack: LocalStack = stack_factory()
    seed_fake_source(stack)
    converted(stack, "rbac-a")
    stack.delete_checkpoint(NS, "rbac-a")
    stack.wait_for(lambda: stack.checkpoint(NS, "rbac-a") is None, 30, "deletion")
    stack.apply(checkpoint_doc("rbac-a"), NS)
    stack.apply(checkpoint_doc("rbac-b"), NS)
    for n in ("rbac-a", "rbac-b"):
        assert (
            ready_condition(wait_phase(stack, NS, n, ("Succeeded", "Failed"), 60))["status"]
            == "True"
        )
    assert stack.emulator is not None
    with urllib.request.urlopen(f"{stack.emulator.url}/emulator/stats?by=agent", timeout=5) as r:
        stats = json.loads(r.read())
    allowed = {
        (res, verb) for rule in REQUIRED_RBAC for res in rule.resources for verb in rule.verbs
    }
    made = {
        (key.split(" ", 1)[1], key.split(" ", 1)[0])
        for agent, counts in stats.items()
        if agent in ("kopf", "OpenAPI-Generator")  # the operator (the stack is preshard-demo)
        for key in counts
    }  # fmt: skip
    assert ("shardedcheckpoints", "get") in made, stats.keys()
    assert made <= allowed, f"calls not allowed by REQUIRED_RBAC: {made - allowed} ({list(stats)})"
