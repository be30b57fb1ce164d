// SegAnyPET Label: the label of a click, sent as the mask's box and filled in to the whole file in the page.
//
// OHIF's MONAI Label panel asks for the whole label as an uncompressed NRRD (output=image): 3.9 MB on a 4 mm
// whole-body scan, 52 MB on an autoPET-sized one. Handing a body that large to the page costs Chromium
// 0.05 s and 0.19-0.25 s whoever serves it, up to twice the model's own click; asking for the mask's box and
// filling the file in here, the whole click costs 0.02 s more than the model's (scripts/benchmark_server.py).
// So this script adds `label_box: true` to the panel's NRRD infer requests, and when the reply says it holds
// the box alone (its X-Label-Box header, "i0 j0 k0 ni nj nk": the box's first voxel and size), hands the panel
// the whole file rebuilt from it: the reply's header, then zeros with the box's voxels (Fortran order, as NRRD
// stores them) in place. Any other reply (an error, a server that sends the whole file) reaches the panel
// untouched.
(function () {
  "use strict";
  const BOX_HEADER = "X-Label-Box";
  const nativeResponse = Object.getOwnPropertyDescriptor(XMLHttpRequest.prototype, "response").get;
  const nativeOpen = XMLHttpRequest.prototype.open;
  const nativeSend = XMLHttpRequest.prototype.send;

  function isLabelRequest(method, url) {
    const target = new URL(url, window.location.href);
    return String(method).toUpperCase() === "POST" && /\/infer\/[^/]+$/.test(target.pathname) &&
      target.searchParams.get("output") === "image";
  }

  // The NRRD header ends at its first blank line.
  function headerLength(bytes) {
    for (let i = 1; i < bytes.length; i++) {
      if (bytes[i] === 10 && bytes[i - 1] === 10) {
        return i + 1;
      }
    }
    throw new Error("the label reply has no NRRD header");
  }

  function wholeLabel(reply, box) {
    const [i0, j0, k0, ni, nj, nk] = box.trim().split(/\s+/).map(Number);
    const bytes = new Uint8Array(reply);
    const start = headerLength(bytes);
    const header = new TextDecoder("ascii").decode(bytes.subarray(0, start));
    const sizes = /^sizes:\s*(\d+)\s+(\d+)\s+(\d+)\s*$/m.exec(header);
    if (!sizes || bytes.length - start !== ni * nj * nk) {
      throw new Error("the label reply does not match its " + BOX_HEADER + " header " + box);
    }
    const [nx, ny, nz] = sizes.slice(1).map(Number);
    const whole = new Uint8Array(start + nx * ny * nz); // zero-filled
    whole.set(bytes.subarray(0, start));
    for (let k = 0; k < nk; k++) {
      for (let j = 0; j < nj; j++) {
        const row = start + ni * (j + nj * k);
        whole.set(bytes.subarray(row, row + ni), start + i0 + nx * (j0 + j + ny * (k0 + k)));
      }
    }
    window.seganyPetLabelBoxReplies = (window.seganyPetLabelBoxReplies || 0) + 1; // read by the tests
    return whole.buffer;
  }

  XMLHttpRequest.prototype.open = function (method, url) {
    this.seganyPetLabelRequest = isLabelRequest(method, url);
    return nativeOpen.apply(this, arguments);
  };

  XMLHttpRequest.prototype.send = function (body) {
    if (this.seganyPetLabelRequest && body instanceof FormData && typeof body.get("params") === "string") {
      let params = null;
      try {
        params = JSON.parse(body.get("params"));
      } catch (error) {
        // not the panel's params: leave the request as it is
      }
      if (params && params.result_extension === ".nrrd" && params.result_compress === false) {
        params.label_box = true;
        body.set("params", JSON.stringify(params));
        let whole = null;
        Object.defineProperty(this, "response", {
          configurable: true,
          get() {
            const reply = nativeResponse.call(this);
            const done = this.readyState === 4 && reply instanceof ArrayBuffer;
            const box = done ? this.getResponseHeader(BOX_HEADER) : null;
            if (!box) {
              return reply;
            }
            if (whole === null) {
              try {
                whole = wholeLabel(reply, box);
              } catch (error) {
                // a throw here would leave the panel's request unsettled: hand it the reply, which it will refuse
                console.error("SegAnyPET label box:", error);
                whole = reply;
              }
            }
            return whole;
          },
        });
      }
    }
    return nativeSend.apply(this, arguments);
  };
})();
