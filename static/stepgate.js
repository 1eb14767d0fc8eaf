// stepgate pages: passkey registration, confirming and cancelling changes, countdowns.
// Served from the gate itself (no CDN); the pages' CSP forbids inline script.
"use strict";

(function () {
  function b64urlToBuffer(value) {
    const padded = value.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((value.length + 3) % 4);
    const raw = atob(padded);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes.buffer;
  }

  function bufferToB64url(buffer) {
    const bytes = new Uint8Array(buffer);
    let raw = "";
    for (let i = 0; i < bytes.length; i++) raw += String.fromCharCode(bytes[i]);
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  // Older browsers lack parse*OptionsFromJSON / toJSON: convert the few binary fields by hand.
  function creationOptions(json) {
    if (window.PublicKeyCredential && PublicKeyCredential.parseCreationOptionsFromJSON) {
      return PublicKeyCredential.parseCreationOptionsFromJSON(json);
    }
    const options = Object.assign({}, json);
    options.challenge = b64urlToBuffer(json.challenge);
    options.user = Object.assign({}, json.user, { id: b64urlToBuffer(json.user.id) });
    options.excludeCredentials = (json.excludeCredentials || []).map(function (c) {
      return Object.assign({}, c, { id: b64urlToBuffer(c.id) });
    });
    return options;
  }

  function requestOptions(json) {
    if (window.PublicKeyCredential && PublicKeyCredential.parseRequestOptionsFromJSON) {
      return PublicKeyCredential.parseRequestOptionsFromJSON(json);
    }
    const options = Object.assign({}, json);
    options.challenge = b64urlToBuffer(json.challenge);
    options.allowCredentials = (json.allowCredentials || []).map(function (c) {
      return Object.assign({}, c, { id: b64urlToBuffer(c.id) });
    });
    return options;
  }

  function credentialJSON(credential) {
    if (typeof credential.toJSON === "function") return credential.toJSON();
    const response = {};
    ["clientDataJSON", "attestationObject", "authenticatorData", "signature", "userHandle"].forEach(function (field) {
      if (credential.response[field]) response[field] = bufferToB64url(credential.response[field]);
    });
    return {
      id: credential.id,
      rawId: bufferToB64url(credential.rawId),
      type: credential.type,
      response: response,
      extensions: credential.getClientExtensionResults ? credential.getClientExtensionResults() : {},
    };
  }

  function show(text, kind) {
    const result = document.getElementById("result");
    if (!result) return;
    result.textContent = text;
    result.className = "result " + (kind || "");
  }

  // The gate's messages are lower-case clauses (they are also JSON); show them as sentences.
  function sentence(text) {
    const trimmed = String(text || "").trim();
    if (!trimmed) return trimmed;
    const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
    return /[.!?]$/.test(capital) ? capital : capital + ".";
  }

  async function postJSON(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      credentials: "same-origin",
      body: JSON.stringify(body || {}),
    });
    let json = {};
    try { json = await response.json(); } catch (e) { json = {}; }
    if (!response.ok) {
      const error = new Error(json.message ? sentence(json.message) : ("The gate answered " + response.status + "."));
      error.code = json.error;
      throw error;
    }
    return json;
  }

  // Browsers reject a ceremony without saying much; turn their errors into sentences.
  function browserError(error) {
    if (error && error.name === "NotAllowedError") {
      // The browser says the same for every failure so pages cannot probe the device; name
      // the usual causes, so a person knows what to try.
      return "Your passkey did not confirm this: the prompt was cancelled or timed out, your device " +
        "could not check your PIN, fingerprint or face, or this device has no passkey for your " +
        "account. Nothing was changed.";
    }
    if (error && error.name === "InvalidStateError") {
      return "This passkey is already registered.";
    }
    return (error && error.message) || "Something went wrong. Nothing was changed.";
  }

  async function register(event) {
    event.preventDefault();
    const name = document.getElementById("passkey-name").value.trim();
    if (!name) { show("Please give the passkey a name.", "error"); return; }
    show("Follow your device's prompt to create the passkey…");
    try {
      const start = await postJSON("/_stepgate/api/passkeys/register/start");
      const credential = await navigator.credentials.create({ publicKey: creationOptions(start.publicKey) });
      const done = await postJSON("/_stepgate/api/passkeys/register/finish", {
        ceremony_id: start.ceremony_id,
        credential: credentialJSON(credential),
        name: name,
      });
      if (done.confirm_url) {
        // A second passkey is itself a protected change: confirm it with an existing passkey.
        window.location.assign(done.confirm_url);
        return;
      }
      show("Your passkey was added.", "ok");
      window.location.reload();
    } catch (error) {
      show(browserError(error), "error");
    }
  }

  async function confirmChange() {
    const section = document.getElementById("change");
    const id = section.dataset.changeId;
    show("Follow your device's prompt to confirm with your passkey…");
    try {
      const start = await postJSON("/_stepgate/api/changes/" + id + "/confirm/start");
      const credential = await navigator.credentials.get({ publicKey: requestOptions(start.publicKey) });
      const done = await postJSON("/_stepgate/api/changes/" + id + "/confirm/finish", {
        ceremony_id: start.ceremony_id,
        credential: credentialJSON(credential),
      });
      show("Confirmed. The change takes effect from " + new Date(done.release_at).toLocaleString() +
        " unless you cancel it before then.", "ok");
      setTimeout(function () { window.location.reload(); }, 1500);
    } catch (error) {
      show(browserError(error), "error");
    }
  }

  async function cancelChange(event) {
    const id = event.currentTarget.dataset.changeId;
    try {
      await postJSON("/_stepgate/api/changes/" + id + "/cancel");
      show("The change was cancelled. Nothing will happen.", "ok");
      setTimeout(function () { window.location.reload(); }, 1000);
    } catch (error) {
      show(browserError(error), "error");
    }
  }

  async function renamePasskey(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const name = form.querySelector("input[name=name]").value.trim();
    try {
      await postJSON("/_stepgate/api/passkeys/" + form.dataset.passkeyId + "/rename", { name: name });
      show("The passkey was renamed.", "ok");
      window.location.reload();
    } catch (error) {
      show(browserError(error), "error");
    }
  }

  async function removePasskey(event) {
    const id = event.currentTarget.dataset.passkeyId;
    try {
      const done = await postJSON("/_stepgate/api/passkeys/" + id + "/remove");
      if (done.confirm_url) {
        window.location.assign(done.confirm_url);
        return;
      }
      show("The passkey was removed.", "ok");
      window.location.reload();
    } catch (error) {
      show(browserError(error), "error");
    }
  }

  async function freezeAccount() {
    try {
      const done = await postJSON("/_stepgate/api/account/freeze");
      show("Your account is frozen. " + done.cancelled.length + " waiting change(s) were cancelled.", "ok");
      setTimeout(function () { window.location.reload(); }, 1500);
    } catch (error) {
      show(browserError(error), "error");
    }
  }

  function tickCountdowns() {
    document.querySelectorAll("[data-until]").forEach(function (element) {
      const left = Math.max(0, Math.round((new Date(element.dataset.until) - new Date()) / 1000));
      const h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
      element.textContent = left === 0 ? "(now)" : "(in " + (h ? h + "h " : "") + m + "m " + s + "s)";
    });
  }

  function localTimes() {
    document.querySelectorAll("time[datetime]").forEach(function (element) {
      const when = new Date(element.getAttribute("datetime"));
      if (!isNaN(when)) element.textContent = when.toLocaleString();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const form = document.getElementById("register-form");
    if (form) form.addEventListener("submit", register);
    const confirmButton = document.getElementById("confirm-button");
    if (confirmButton) confirmButton.addEventListener("click", confirmChange);
    document.querySelectorAll(".rename-form").forEach(function (f) { f.addEventListener("submit", renamePasskey); });
    document.querySelectorAll(".remove-button").forEach(function (b) { b.addEventListener("click", removePasskey); });
    document.querySelectorAll("#cancel-button, .cancel-button").forEach(function (button) {
      button.addEventListener("click", cancelChange);
    });
    const freezeButton = document.getElementById("freeze-button");
    if (freezeButton) freezeButton.addEventListener("click", freezeAccount);
    localTimes();
    tickCountdowns();
    setInterval(tickCountdowns, 1000);
  });
})();
