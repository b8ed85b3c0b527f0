// The breastcad page: send a dropped image to /api/v1/predict and show the answer.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "breastcad-token";
  let imageUrl = null;

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
  function authHeaders() {
    const t = token();
    return t ? { Authorization: "Bearer " + t } : {};
  }
  function show(el, on) { el.hidden = !on; }
  function setError(text) {
    $("error").textContent = text || "";
    show($("error"), Boolean(text));
  }
  function fmt(p) { return (100 * p).toFixed(1) + "%"; }

  async function loadCard() {
    try {
      const r = await fetch("/api/v1/model", { headers: authHeaders() });
      if (r.status === 401) { show($("token-box"), true); $("model-line").textContent = "Access token needed."; return; }
      const card = await r.json();
      const auc = card.cross_validated_metrics && card.cross_validated_metrics.pooled &&
        card.cross_validated_metrics.pooled.roc_auc;
      let line = card.name + " (version " + card.version + ", task " + card.task + ")";
      if (auc) {
        line += "; cross-validated ROC-AUC " + auc.value.toFixed(3) + " (95% CI " +
          auc.low.toFixed(3) + "-" + auc.high.toFixed(3) + ")";
      }
      $("model-line").textContent = line;
    } catch (e) {
      $("model-line").textContent = "Model card unavailable.";
    }
  }

  async function send(file) {
    setError("");
    if (!file) return;
    $("status").textContent = "Analysing " + (file.name || "the image") + "\u2026";
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = URL.createObjectURL(file);
    const form = new FormData();
    form.append("file", file, file.name || "upload");
    let r, body;
    try {
      r = await fetch("/api/v1/predict?heatmap=true", { method: "POST", body: form, headers: authHeaders() });
      body = await r.json();
    } catch (e) {
      $("status").textContent = "";
      setError("The server did not answer (" + e + ").");
      return;
    }
    $("status").textContent = "";
    if (!r.ok) {
      if (r.status === 401) show($("token-box"), true);
      const msg = body && body.error ? body.error.message : "HTTP " + r.status;
      setError("Could not analyse this file: " + msg);
      show($("result"), false);
      return;
    }
    render(body);
  }

  function render(res) {
    const hm = res.heatmap;
    // the server's rendering of the decoded image works for DICOM too
    $("image").src = hm ? "data:image/png;base64," + hm.image_png_base64 : imageUrl;
    if (hm) {
      $("heatmap").src = "data:image/png;base64," + hm.overlay_png_base64;
      $("heatmap-caption").textContent = "Heatmap (Grad-CAM): " + hm.meaning;
      show($("heatmap").parentElement, true);
    } else {
      $("heatmap").removeAttribute("src");
      $("heatmap-caption").textContent = res.heatmap_unavailable || "No heatmap.";
    }
    const op = res.operating_point;
    $("positive-class").textContent = res.positive_class;
    $("probability").textContent = fmt(res.probability);
    $("threshold").textContent = fmt(op.threshold);
    $("decision").textContent = res.decision;
    $("bar-fill").style.width = fmt(res.probability);
    $("bar-threshold").style.left = fmt(op.threshold);
    $("meaning").textContent = "What the probability means: " + res.probability_meaning + ".";
    let opLine = "Model " + res.model.name + " version " + res.model.version + ".";
    if (op.target_sensitivity !== undefined) {
      opLine += " The threshold was chosen for a sensitivity of " + fmt(op.target_sensitivity) +
        " on validation data";
      if (op.test_sensitivity !== undefined) {
        opLine += "; on the cross-validation test folds it gave sensitivity " + fmt(op.test_sensitivity) +
          " and specificity " + fmt(op.test_specificity);
      }
      opLine += ".";
    }
    $("op-line").textContent = opLine + " " + res.disclaimer;
    show($("result"), true);
  }

  function init() {
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
    });
    drop.addEventListener("click", (e) => { if (e.target === drop) $("file").click(); });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
    $("file").addEventListener("change", () => { if ($("file").files.length) send($("file").files[0]); });
    $("token-save").addEventListener("click", () => {
      sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
      show($("token-box"), false);
      loadCard();
    });
    loadCard();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
