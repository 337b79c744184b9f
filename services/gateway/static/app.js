// The upload page: POST the file to /v1/classify (multipart) and draw the cxr.v1 ClassifyResponse (protobuf JSON).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("upload"), drop = $("drop"), fileInput = $("file"), submit = $("submit");
  const tokenInput = $("token");
  let file = null, imageUrl = null;

  tokenInput.value = sessionStorage.getItem("cxr-token") || "";
  tokenInput.addEventListener("change", () => sessionStorage.setItem("cxr-token", tokenInput.value));

  function headers() {
    const token = tokenInput.value.trim();
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function setState(state, text) {
    document.body.dataset.state = state;
    $("status").textContent = text || "";
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
    setState("error", "");
  }

  async function loadModels() {
    try {
      const answer = await fetch("/v1/models", { headers: headers() });
      if (!answer.ok) return;
      const select = $("model");
      for (const model of (await answer.json()).models || []) {
        const option = document.createElement("option");
        option.value = model.name;
        option.textContent = model.name + (model.isDefault ? " (default)" : "") + (model.ready ? "" : " (not ready)");
        select.appendChild(option);
      }
    } catch (e) { /* the list is a convenience; classify still works with the default model */ }
  }

  function choose(chosen) {
    file = chosen || null;
    $("drop-help").textContent = file ? "Selected: " + file.name + " (" + file.size + " bytes)"
                                      : "Drop a DICOM, PNG or JPEG here, or choose a file";
  }

  fileInput.addEventListener("change", () => choose(fileInput.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => {
    if (event.dataTransfer.files.length) choose(event.dataTransfer.files[0]);
  });

  function percent(p) { return (100 * p).toFixed(1) + " %"; }

  function render(answer) {
    const classes = answer.classes || [];
    $("top-class").textContent = answer.topClass;
    $("top-probability").textContent = percent(answer.topProbability);
    $("model-name").textContent = answer.modelName;
    $("model-version").textContent = answer.modelVersion;
    $("model-sha").textContent = answer.modelSha256 ? "sha256 " + answer.modelSha256.slice(0, 12) : "";
    const bars = $("bars");
    bars.replaceChildren();
    for (const entry of classes) {
      const p = entry.probability || 0;
      const row = document.createElement("li");
      row.dataset.label = entry.label;
      row.dataset.probability = String(p);
      if (entry.label === answer.topClass) row.classList.add("top");
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = entry.label;
      const track = document.createElement("span");
      track.className = "track";
      track.setAttribute("role", "meter");
      track.setAttribute("aria-valuemin", "0");
      track.setAttribute("aria-valuemax", "1");
      track.setAttribute("aria-valuenow", String(p));
      track.setAttribute("aria-label", entry.label);
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = (100 * p).toFixed(2) + "%";
      track.appendChild(fill);
      const value = document.createElement("span");
      value.className = "value";
      value.textContent = percent(p);
      row.append(label, track, value);
      bars.appendChild(row);
    }
    const notices = $("notices");
    notices.replaceChildren();
    for (const notice of answer.notices || []) {
      const item = document.createElement("li");
      item.textContent = notice;
      notices.appendChild(item);
    }
    const browserCanDraw = answer.imageFormat === "png" || answer.imageFormat === "jpeg";
    $("image-figure").hidden = !browserCanDraw;
    if (browserCanDraw) $("image").src = imageUrl;
    const heatmap = answer.heatmap && answer.heatmap.png;
    $("heatmap-figure").hidden = !heatmap;
    if (heatmap) {
      $("heatmap-image").src = "data:image/png;base64," + answer.heatmap.png;
      $("heatmap-caption").textContent = "heatmap of " + answer.heatmap.label + " over the image as the gateway read it"
        + (browserCanDraw ? "" : " (a browser cannot draw DICOM itself)");
    }
    $("result").hidden = false;
    setState("done", "Answered in " + Math.round((answer.timings || {}).totalMs || 0) + " ms.");
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    $("error").hidden = true;
    if (!file) { showError("Choose or drop a file first."); return; }
    const body = new FormData();
    body.append("image", file, file.name);
    body.append("model", $("model").value);
    body.append("version", $("version").value.trim());
    body.append("heatmap", $("heatmap").checked ? "true" : "false");
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = URL.createObjectURL(file);
    submit.disabled = true;
    setState("busy", "Classifying " + file.name + " ...");
    try {
      const answer = await fetch("/v1/classify", { method: "POST", body: body, headers: headers() });
      let json = null;
      try { json = await answer.json(); } catch (e) { json = null; }
      if (!answer.ok) {
        showError((json && json.message) || ("The gateway answered HTTP " + answer.status + "."));
        return;
      }
      render(json);
    } catch (e) {
      showError("The gateway could not be reached: " + e.message);
    } finally {
      submit.disabled = false;
    }
  });

  setState("idle", "");
  loadModels();
})();
