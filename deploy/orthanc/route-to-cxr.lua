-- Staging auto-routing: every new radiograph (CR or DX) stored in this Orthanc goes to the cxr DICOM node, which
-- answers with an SR and a Secondary Capture in the same study. The results (SR, OT) are not routed back.
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags["Modality"]
  if modality == "CR" or modality == "DX" then
    SendToModality(instanceId, "cxr")
  end
end
