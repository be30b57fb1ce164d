// SegAnyPET Label: a "Save label" button for the OHIF viewer this server bundles.
//
// OHIF's MONAI Label mode shows the segmentation a click returns but has no way to save it. This script,
// served after OHIF's own app-config.js, adds one button: it sends the labelmap the MONAI Label panel drew
// (segmentation "1", the panel's) to PUT /datastore/label as label.bin, the format of OHIF's MONAI Label
// client (uint8 voxels in the series' volume order), tagged "final". A DICOMweb datastore stores it in the
// PACS as a DICOM-SEG referencing the series. OHIF exposes its services on window for such add-ons.
(function () {
  "use strict";
  const BUTTON_ID = "segany-pet-save-label";
  const PANEL_SEGMENTATION = "1"; // the id the MONAI Label panel gives the labelmap it fills

  function notify(type, message) {
    const notifications = window.services && window.services.uiNotificationService;
    if (notifications) {
      notifications.show({ title: "Save label", message: message, type: type, duration: 8000 });
    }
    document.getElementById(BUTTON_ID).dataset.lastResult = type + ": " + message;
  }

  function activeSeriesUID(services) {
    const { viewportGridService, displaySetService } = services;
    const state = viewportGridService.getState();
    const viewport = state.viewports.get(state.activeViewportId);
    if (!viewport || !viewport.displaySetInstanceUIDs.length) {
      return null;
    }
    const displaySet = displaySetService.getDisplaySetByUID(viewport.displaySetInstanceUIDs[0]);
    return displaySet ? displaySet.SeriesInstanceUID : null;
  }

  async function labelNames() {
    const reply = await fetch(new URL("info/", window.location.origin));
    const info = await reply.json();
    const labels = (info.models && info.models.segany_pet && info.models.segany_pet.labels) || { lesion: 1 };
    return Object.entries(labels).map(([name, idx]) => ({ name: name, idx: idx }));
  }

  async function saveLabel() {
    const services = window.services;
    if (!services) {
      notify("error", "the viewer is still starting; try again in a moment");
      return;
    }
    const labelmap = services.segmentationService.getLabelmapVolume(PANEL_SEGMENTATION);
    if (!labelmap) {
      notify("warning", "there is no segmentation to save: run Point Prompts on the scan first");
      return;
    }
    const voxels = labelmap.voxelManager.getCompleteScalarDataArray();
    if (!voxels.some((value) => value !== 0)) {
      notify("warning", "the segmentation is empty: there is nothing to save");
      return;
    }
    const series = activeSeriesUID(services);
    if (!series) {
      notify("error", "no series is shown in the active viewport");
      return;
    }
    const form = new FormData();
    form.append("params", JSON.stringify({ label_info: await labelNames(), source: "OHIF" }));
    form.append("label", new Blob([Uint8Array.from(voxels)]), "label.bin");
    const url = new URL("datastore/label", window.location.origin);
    url.searchParams.set("image", series);
    url.searchParams.set("tag", "final");
    const reply = await fetch(url, { method: "PUT", body: form });
    if (reply.ok) {
      notify("success", "saved as the series' final label");
    } else {
      let detail = reply.statusText;
      try {
        detail = (await reply.json()).detail || detail;
      } catch (ignored) {
        // not JSON: keep the status text
      }
      notify("error", `the server answered ${reply.status}: ${detail}`);
    }
  }

  function addButton() {
    if (document.getElementById(BUTTON_ID) || !document.body) {
      return;
    }
    const button = document.createElement("button");
    button.id = BUTTON_ID;
    button.textContent = "Save label";
    button.title = "Save the MONAI Label segmentation as this series' final label (DICOM-SEG in the PACS)";
    button.style.cssText =
      "position:fixed;left:12px;bottom:12px;z-index:1000;padding:6px 14px;border-radius:4px;border:0;" +
      "background:#5acce6;color:#000;font:600 13px sans-serif;cursor:pointer";
    button.addEventListener("click", () => {
      button.disabled = true;
      saveLabel()
        .catch((error) => notify("error", String(error)))
        .finally(() => {
          button.disabled = false;
        });
    });
    document.body.appendChild(button);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", addButton);
  } else {
    addButton();
  }
})();
