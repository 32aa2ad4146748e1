-- Argo CD health check for preshard.io/ShardedCheckpoint.
-- Install: argocd-cm data key "resource.customizations.health.preshard.io_ShardedCheckpoint"
-- (see docs/install.md). Reads what the operator writes: status.observedGeneration,
-- status.phase and the Ready condition (with its own observedGeneration).
local hs = {}
if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the preshard operator"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end
local ready = nil
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    if c.type == "Ready" then
      ready = c
    end
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the preshard operator"
  return hs
end
local message = ready.message or ready.reason or ""
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message
  return hs
end
-- Not ready: failed for good, waiting for a person, or still working.
local needs_action = {
  CredentialsSecretNotFound = true,
  OutputConflict = true,
  JobNameConflict = true,
  InvalidSpec = true,
  InvalidURI = true,
  Unschedulable = true,
  PodWaiting = true,
  CreateContainerConfigError = true,
  ImagePullBackOff = true,
  ErrImagePull = true,
  InvalidImageName = true,
  CreateContainerError = true,
}
if obj.status.phase == "Failed" or needs_action[ready.reason] then
  hs.status = "Degraded"
  hs.message = ready.reason .. ": " .. message
  return hs
end
hs.status = "Progressing"
hs.message = message
return hs
