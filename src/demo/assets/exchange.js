// The demo exchange's API-keys page. It behaves like a client of a real exchange behind
// stepgate: it saves a key, and when the gate answers "step_up_required" it shows where to
// confirm, then re-sends the identical request with the Stepgate-Change header to finish.
// No innerHTML anywhere: every user-controlled string goes in through textContent.
'use strict';

(function () {
  const rows = document.getElementById('key-rows');
  if (!rows) {
    return; // The login page has nothing to wire up.
  }
  const user = document.body.dataset.user || '';
  // One pending change per user survives reloads, so closing the tab while cooling off
  // does not lose the way to finish it.
  const storageKey = 'stepgate-demo-pending:' + user;
  const PERMISSIONS = ['read', 'trade', 'withdraw'];

  const status = document.getElementById('status');
  const panel = document.getElementById('step-up');
  const summary = document.getElementById('step-up-summary');
  const link = document.getElementById('step-up-link');
  const timing = document.getElementById('step-up-timing');
  const finishButton = document.getElementById('step-up-finish');
  const forgetButton = document.getElementById('step-up-forget');
  const result = document.getElementById('step-up-result');
  const createForm = document.getElementById('create-key');
  const newLabel = document.getElementById('new-label');

  let countdown = null;

  function setStatus(text, kind) {
    status.textContent = text || '';
    status.className = 'status' + (kind ? ' ' + kind : '');
  }

  function setResult(text, kind) {
    result.textContent = text || '';
    result.className = 'result' + (kind ? ' ' + kind : '');
  }

  function stopCountdown() {
    if (countdown !== null) {
      clearInterval(countdown);
      countdown = null;
    }
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (_) {
      return null;
    }
  }

  function describeError(response, data) {
    if (data && typeof data.message === 'string' && data.message) {
      return data.message;
    }
    return 'The server answered ' + response.status + ' ' + (response.statusText || '') + '.';
  }

  function formatTime(date) {
    return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  }

  function formatDuration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    const minutes = Math.floor(seconds / 60);
    const rest = seconds % 60;
    return minutes + ':' + String(rest).padStart(2, '0');
  }

  function humanDuration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    const units = [
      [3600, 'hour'],
      [60, 'minute'],
      [1, 'second'],
    ];
    const parts = [];
    for (const [size, name] of units) {
      const count = Math.floor(seconds / size);
      seconds -= count * size;
      if (count > 0) {
        parts.push(count + ' ' + name + (count === 1 ? '' : 's'));
      }
    }
    return parts.length ? parts.join(' ') : '0 seconds';
  }

  function newIdempotencyKey() {
    if (window.crypto && typeof window.crypto.randomUUID === 'function') {
      return window.crypto.randomUUID();
    }
    return Date.now().toString(36) + '-' + Math.random().toString(36).slice(2);
  }

  // ---- The key table -------------------------------------------------------------------

  function renderKeys(keys) {
    const fragment = document.createDocumentFragment();
    for (const key of keys) {
      const row = document.createElement('tr');
      row.dataset.keyId = key.id;
      row.dataset.label = key.label;

      const name = document.createElement('td');
      name.className = 'key-name';
      const label = document.createElement('span');
      label.className = 'label';
      label.textContent = key.label;
      const code = document.createElement('code');
      code.textContent = key.id;
      name.append(label, ' ', code);
      row.append(name);

      for (const permission of PERMISSIONS) {
        const cell = document.createElement('td');
        cell.className = 'perm';
        const wrapper = document.createElement('label');
        const box = document.createElement('input');
        box.type = 'checkbox';
        box.value = permission;
        box.checked = key.permissions.includes(permission);
        wrapper.append(box, ' ' + permission);
        cell.append(wrapper);
        row.append(cell);
      }

      const actions = document.createElement('td');
      actions.className = 'actions';
      const save = document.createElement('button');
      save.type = 'button';
      save.className = 'save';
      save.textContent = 'Save';
      actions.append(save);
      row.append(actions);
      fragment.append(row);
    }
    rows.replaceChildren(fragment);
  }

  async function refresh() {
    try {
      const response = await fetch('/api/v1/api-keys', { credentials: 'same-origin' });
      const data = await readJson(response);
      if (response.ok && data && Array.isArray(data.keys)) {
        renderKeys(data.keys);
      } else if (response.status === 401) {
        window.location.assign('/');
      }
    } catch (_) {
      // The table keeps its last state; the status line already says what happened.
    }
  }

  function sendUpdate(keyId, body, changeId) {
    const headers = { 'Content-Type': 'application/json' };
    if (changeId) {
      headers['Stepgate-Change'] = changeId;
    }
    return fetch('/api/v1/api-keys/' + encodeURIComponent(keyId), {
      method: 'PUT',
      headers: headers,
      body: body,
      credentials: 'same-origin',
    });
  }

  // ---- The held change -----------------------------------------------------------------

  function loadPending() {
    try {
      const pending = JSON.parse(window.localStorage.getItem(storageKey) || 'null');
      if (pending && pending.changeId && pending.keyId && typeof pending.body === 'string') {
        return pending;
      }
    } catch (_) {
      // A damaged entry is as good as none.
    }
    return null;
  }

  function storePending(pending) {
    try {
      window.localStorage.setItem(storageKey, JSON.stringify(pending));
    } catch (_) {
      // Private mode may refuse storage; the panel still works until the page is left.
    }
  }

  function clearPending() {
    try {
      window.localStorage.removeItem(storageKey);
    } catch (_) {
      // Nothing to clean up then.
    }
  }

  // Only http(s) links: a confirm_url is data from the network, never a javascript: URL.
  function safeUrl(text) {
    try {
      const url = new URL(text, window.location.href);
      return url.protocol === 'http:' || url.protocol === 'https:' ? url.href : null;
    } catch (_) {
      return null;
    }
  }

  function showPending(pending) {
    summary.textContent = pending.summary || 'A change to API key ' + pending.keyId;
    const url = safeUrl(pending.confirmUrl);
    if (url) {
      link.href = url;
      link.hidden = false;
    } else {
      link.removeAttribute('href');
      link.hidden = true;
    }
    const parts = [];
    if (pending.confirmBefore) {
      const deadline = new Date(pending.confirmBefore);
      if (!isNaN(deadline)) {
        parts.push('Confirm before ' + formatTime(deadline) + '.');
      }
    }
    if (typeof pending.coolingOffSeconds === 'number') {
      parts.push(
        'After you confirm, the change waits ' + humanDuration(pending.coolingOffSeconds) +
          ' before it can be finished; you can cancel it at any time until then.'
      );
    }
    timing.textContent = parts.join(' ');
    finishButton.disabled = false;
    panel.hidden = false;
  }

  function closePending(message, kind) {
    stopCountdown();
    clearPending();
    panel.hidden = true;
    setResult('');
    setStatus(message, kind);
  }

  function showCoolingOff(releaseAt) {
    stopCountdown();
    const tick = function () {
      const left = (releaseAt.getTime() - Date.now()) / 1000;
      if (left <= 0) {
        stopCountdown();
        setResult('The cooling-off is over: press "Finish the change" again.', 'ok');
        return;
      }
      setResult(
        'Still cooling off until ' + formatTime(releaseAt) + ' (' + formatDuration(left) +
          ' left). The wait is what makes a pressured change impossible to finish during a call.',
        'wait'
      );
    };
    tick();
    countdown = setInterval(tick, 1000);
  }

  function releaseTime(response, data) {
    if (data && data.release_at) {
      const at = new Date(data.release_at);
      if (!isNaN(at)) {
        return at;
      }
    }
    const retryAfter = Number(response.headers.get('Retry-After'));
    return new Date(Date.now() + (isFinite(retryAfter) ? retryAfter : 0) * 1000);
  }

  async function finish() {
    const pending = loadPending();
    if (!pending) {
      panel.hidden = true;
      return;
    }
    stopCountdown();
    finishButton.disabled = true;
    setResult('Sending the change again…');
    let response;
    try {
      response = await sendUpdate(pending.keyId, pending.body, pending.changeId);
    } catch (error) {
      setResult('Could not reach the gate: ' + error.message, 'error');
      finishButton.disabled = false;
      return;
    }
    const data = await readJson(response);
    const code = data && data.error;
    finishButton.disabled = false;
    if (response.ok) {
      closePending('Done: withdrawals enabled on ' + (pending.label || pending.keyId) + '.', 'ok');
      await refresh();
    } else if (response.status === 403 && code === 'cooling_off') {
      showCoolingOff(releaseTime(response, data));
    } else if (response.status === 403 && code === 'not_confirmed') {
      setResult('Confirm it with your passkey first (use the link above).', 'error');
    } else if (response.status === 403 && code === 'change_cancelled') {
      closePending('That change was cancelled, so nothing was changed.', 'error');
    } else if (response.status === 403 && code === 'change_expired') {
      closePending('That change expired before it was finished. Save again to start over.', 'error');
    } else if (response.status === 409 && code === 'change_already_applied') {
      closePending('That change was already applied.', 'ok');
      await refresh();
    } else {
      setResult(describeError(response, data), 'error');
    }
  }

  // ---- Saving and creating keys --------------------------------------------------------

  async function save(row) {
    const keyId = row.dataset.keyId;
    const permissions = Array.from(row.querySelectorAll('input[type="checkbox"]:checked')).map(
      function (box) {
        return box.value;
      }
    );
    // The exact string is kept: finishing a held change must send the same bytes again.
    const body = JSON.stringify({ permissions: permissions });
    setStatus('Saving…');
    let response;
    try {
      response = await sendUpdate(keyId, body, null);
    } catch (error) {
      setStatus('Could not reach the server: ' + error.message, 'error');
      return;
    }
    const data = await readJson(response);
    if (response.status === 403 && data && data.error === 'step_up_required') {
      const pending = {
        keyId: keyId,
        label: row.dataset.label || '',
        body: body,
        changeId: data.change_id,
        confirmUrl: data.confirm_url,
        summary: data.summary,
        coolingOffSeconds: data.cooling_off_seconds,
        confirmBefore: data.confirm_before,
      };
      storePending(pending);
      stopCountdown();
      setResult('');
      setStatus('');
      showPending(pending);
      panel.scrollIntoView({ behavior: 'smooth', block: 'start' });
      await refresh(); // The table shows what the exchange really has: not changed yet.
      return;
    }
    if (response.ok) {
      setStatus('Saved ' + (row.dataset.label || keyId) + '.', 'ok');
      await refresh();
      return;
    }
    setStatus(describeError(response, data), 'error');
  }

  rows.addEventListener('click', function (event) {
    const button = event.target.closest('button.save');
    if (button) {
      const row = button.closest('tr');
      if (row) {
        save(row);
      }
    }
  });

  createForm.addEventListener('submit', async function (event) {
    event.preventDefault();
    const label = newLabel.value.trim();
    if (!label) {
      return;
    }
    setStatus('Creating…');
    try {
      const response = await fetch('/api/v1/api-keys', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'Idempotency-Key': newIdempotencyKey() },
        body: JSON.stringify({ label: label }),
        credentials: 'same-origin',
      });
      const data = await readJson(response);
      if (response.ok) {
        newLabel.value = '';
        setStatus('Created ' + label + ' (read only).', 'ok');
        await refresh();
      } else {
        setStatus(describeError(response, data), 'error');
      }
    } catch (error) {
      setStatus('Could not reach the server: ' + error.message, 'error');
    }
  });

  finishButton.addEventListener('click', finish);
  forgetButton.addEventListener('click', function () {
    closePending('Forgotten here. A held change you never confirm simply expires; ' +
      'you can also cancel it under Pending changes.');
  });

  const pending = loadPending();
  if (pending) {
    showPending(pending);
  }
})();
