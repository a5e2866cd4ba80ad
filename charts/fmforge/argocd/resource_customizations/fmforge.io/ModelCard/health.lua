-- Health of an fmforge.io/v1alpha1 ModelCard, for Argo CD.
--
-- fmforge writes status.phase (Pending, Waiting, Running, Succeeded or Failed), a Ready condition in
-- metav1.Condition form (with Reconciling and Stalled in kstatus form), status.message and
-- status.observedGeneration. A status that describes an older generation than the spec is
-- Progressing: the operator has not acted on the change yet, whatever the old status says.
--
-- Only Lua's base and table libraries are used: Argo CD runs a script from argocd-cm without the
-- string, math and os libraries unless useOpenLibs is set for the kind. Every field is checked
-- for its type before use, so an unexpected status gives a health, never a script error.
local hs = {}

local function text(v)
  if type(v) == "string" and v ~= "" then
    return v
  end
  return nil
end

local function condition(status, wanted)
  if type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if type(c) == "table" and c.type == wanted then
      return c
    end
  end
  return nil
end

-- phase -> health
local phases = {
  Pending = "Progressing",
  Waiting = "Progressing",
  Running = "Progressing",
  Succeeded = "Healthy",
  Failed = "Degraded",
}

local meta = obj.metadata
if type(meta) ~= "table" then
  meta = {}
end
if meta.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "Pending deletion"
  return hs
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the fmforge operator to report a status"
  return hs
end
if type(status) ~= "table" then
  hs.status = "Unknown"
  hs.message = "status is a " .. type(status) .. ", not an object"
  return hs
end

local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")

local observed = status.observedGeneration
if type(observed) ~= "number" and ready ~= nil then
  observed = ready.observedGeneration
end
if type(meta.generation) == "number" and type(observed) == "number" and observed < meta.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the fmforge operator to act on generation " .. meta.generation ..
    " (the status is of generation " .. observed .. ")"
  return hs
end

local message = text(status.message)
if message == nil and ready ~= nil then
  message = text(ready.message)
end

local phase = status.phase
if phase == nil then
  -- No phase: judge by the kstatus conditions alone.
  if stalled ~= nil and stalled.status == "True" then
    hs.status = "Degraded"
  elseif ready ~= nil and ready.status == "True" then
    hs.status = "Healthy"
  else
    hs.status = "Progressing"
  end
  hs.message = message or "Waiting for the fmforge operator to report a phase"
  return hs
end
if type(phase) ~= "string" then
  hs.status = "Unknown"
  hs.message = "status.phase is a " .. type(phase) .. ", not a string"
  return hs
end
if phases[phase] == nil then
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. phase .. (message and (": " .. message) or "")
  return hs
end

-- With approval: manual, an evaluated model waits (phase Waiting, Ready reason WaitingForApproval)
-- until a person approves its digest with the annotations fmforge.io/approved-by and
-- fmforge.io/approved-digest. Only a person can move it on, so it is Suspended; once annotated
-- with the digest the card evaluated, it is Progressing until the operator records the approval.
if phase == "Waiting" and ready ~= nil and ready.reason == "WaitingForApproval" then
  local annotations = meta.annotations
  if type(annotations) ~= "table" then
    annotations = {}
  end
  local by = text(annotations["fmforge.io/approved-by"])
  local digest = text(annotations["fmforge.io/approved-digest"])
  if by ~= nil and digest ~= nil and digest == status.modelDigest then
    hs.status = "Progressing"
    hs.message = "Approved by " .. by .. "; waiting for the fmforge operator to record the approval"
    return hs
  end
  hs.status = "Suspended"
  hs.message = message or "Waiting for a manual approval"
  return hs
end

hs.status = phases[phase]
if hs.status == "Healthy" and ready ~= nil and ready.status ~= "True" then
  -- The phase says done but Ready does not agree (yet): Ready is what kubectl wait trusts.
  hs.status = "Progressing"
end
hs.message = message or phase
return hs
