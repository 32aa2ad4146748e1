"""Pure logic: no kopf, no Kubernetes client, no boto3, no vLLM. Everything here is a
function of its arguments, so it is unit-tested without servers."""
