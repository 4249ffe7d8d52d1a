-- Argo CD health check for kubetuner.dev/TrainingJob, read from the conditions the operator sets
-- (docs/argocd/README.md says where it goes). Like Argo CD's own check for batch Jobs: a job
-- still training is Progressing, a finished one Healthy, a failed or stalled one Degraded.
local hs = { status = "Progressing", message = "Waiting for the kubetuner operator" }
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= nil and obj.status.observedGeneration < generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local conditions = {}
for _, condition in ipairs(obj.status.conditions) do
  conditions[condition.type] = condition
end
local function is_true(ctype)
  return conditions[ctype] ~= nil and conditions[ctype].status == "True"
end
local function message_of(ctype)
  local message = conditions[ctype].message
  if message == nil or message == "" then
    return obj.status.message or ""
  end
  return message
end
if is_true("Stalled") then
  hs.status = "Degraded"
  hs.message = message_of("Stalled")
elseif is_true("Failed") then
  hs.status = "Degraded"
  hs.message = message_of("Failed")
elseif is_true("Succeeded") then
  hs.status = "Healthy"
  hs.message = message_of("Succeeded")
elseif is_true("Suspended") then
  hs.status = "Suspended"
  hs.message = message_of("Suspended")
else
  hs.status = "Progressing"
  hs.message = obj.status.message or ""
end
return hs
