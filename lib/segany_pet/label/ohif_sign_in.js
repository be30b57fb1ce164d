// SegAnyPET Label: sign-in for the bundled OHIF when the server has it on (--conf auth_tokens).
//
// OHIF's MONAI Label panel and its DICOMweb client send no credentials of their own. So, before the viewer
// starts, this script asks the server whether sign-in is on (GET /auth/, MONAI Label's handshake); if so it asks
// the annotator for their token once per browser tab (kept in sessionStorage, which ends with the tab), checks it
// (GET /auth/token/valid), and adds "Authorization: Bearer <token>" to every request the page makes to this
// server, through XMLHttpRequest (the panel's axios, the DICOMweb client, the image loader) and fetch. Requests to
// other origins go without it: the token is for this server only.
(function () {
  "use strict";
  const STORAGE_KEY = "seganyPetToken";
  const ATTEMPTS = 3;

  function sameOrigin(url) {
    return new URL(url, window.location.href).origin === window.location.origin;
  }

  // Synchronous on purpose: the viewer must not start its requests before the token is known.
  function status(path, token) {
    const request = new XMLHttpRequest();
    request.open("GET", path, false);
    if (token) {
      request.setRequestHeader("Authorization", "Bearer " + token);
    }
    request.send();
    return request;
  }

  function signInEnabled() {
    const reply = status("/auth/");
    try {
      return reply.status === 200 && JSON.parse(reply.responseText).enabled === true;
    } catch (error) {
      return false;
    }
  }

  function validToken(token) {
    return Boolean(token) && status("/auth/token/valid", token).status === 200;
  }

  function signIn() {
    let token = window.sessionStorage.getItem(STORAGE_KEY);
    for (let attempt = 0; !validToken(token) && attempt < ATTEMPTS; attempt++) {
      const question = attempt === 0 ? "SegAnyPET Label: your access token" :
        "That token is not valid on this server. Your access token (ask the server's admin)";
      token = (window.prompt(question) || "").trim();
    }
    if (!validToken(token)) {
      window.sessionStorage.removeItem(STORAGE_KEY);
      window.alert("SegAnyPET Label: without a valid token the viewer cannot load studies. Reload to try again.");
      return null;
    }
    window.sessionStorage.setItem(STORAGE_KEY, token);
    return token;
  }

  if (!signInEnabled()) {
    return;
  }
  const token = signIn();
  if (!token) {
    return;
  }
  const header = "Bearer " + token;

  const nativeOpen = XMLHttpRequest.prototype.open;
  const nativeSend = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function (method, url) {
    this.seganyPetSignIn = sameOrigin(url);
    return nativeOpen.apply(this, arguments);
  };
  XMLHttpRequest.prototype.send = function () {
    if (this.seganyPetSignIn) {
      this.setRequestHeader("Authorization", header);
    }
    return nativeSend.apply(this, arguments);
  };

  const nativeFetch = window.fetch.bind(window);
  window.fetch = function (resource, options) {
    const url = resource instanceof Request ? resource.url : String(resource);
    if (!sameOrigin(url)) {
      return nativeFetch(resource, options);
    }
    const request = new Request(resource, options);
    request.headers.set("Authorization", header);
    return nativeFetch(request);
  };
})();
