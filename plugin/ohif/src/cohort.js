/**
 * Cohort export (POST /api/v1/cohort): the result list as the panel shows it, the query first, as a CSV download
 * ("Export cohort") or as a DICOM Key Object Selection document stored in the PACS ("Save to PACS (KOS)").
 *
 * - cohortRequest: the request body for the panel's state (the hits best first, by SOP Instance UID);
 * - createCohortExport: runs an export and holds its status (busy, done with a message, failed with the reason);
 * - renderCohort: the two buttons and the status line (plain DOM, text only, as in panel.js).
 */

import { joinUrl } from './logic.js';

export const CSV_FILENAME = 'medsim-cohort.csv';

/** The body of POST /cohort for a panel state with results, or null when there is nothing to export. */
export function cohortRequest(state, format) {
  const response = state?.response;
  const results = response?.results || [];
  const query = { ...(state?.query || {}), ...(response?.query || {}) };
  if (!results.length || !query.sop_uid) {
    return null;
  }
  const body = {
    query: { study_uid: query.study_uid, series_uid: query.series_uid, sop_uid: query.sop_uid },
    hits: results.map(row => row.sop_uid),
    format,
  };
  if (response.filters && Object.keys(response.filters).length) {
    body.filters = response.filters;
  }
  return body;
}

/** Hand `blob` to the browser as a download named `name`. */
export function saveBlob(blob, name, doc = globalThis.document) {
  const url = URL.createObjectURL(blob);
  const link = doc.createElement('a');
  link.href = url;
  link.download = name;
  link.style.display = 'none';
  doc.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

/** What the panel says after a KOS was stored (the API's 201 answer). */
export function savedMessage(answer) {
  return `Saved to the PACS: series "${answer.series_description || 'medsim cohort'}" (KO) in the query's study, ` +
    `referencing ${answer.references} images (the query and its results). Any DICOM viewer lists it there.`;
}

/**
 * Cohort export for a controller (logic.createController).
 *   fetch      window.fetch (or a fake)
 *   headers()  extra headers for the API (the OHIF user's bearer token), or {}
 *   download(blob, name)  how a CSV reaches the user (default: a browser download)
 * model() → {available, status: 'idle'|'busy'|'done'|'error', format, message}; the status belongs to the result
 * list it was made for, so a new search clears it.
 */
export function createCohortExport({ controller, fetch: fetchImpl, headers = () => ({}), download = saveBlob }) {
  let status = { status: 'idle' };
  const listeners = new Set();

  function set(next) {
    status = next;
    listeners.forEach(listener => listener());
  }

  function model() {
    const state = controller.getState();
    const current = status.seq === state.seq && status.response === state.response ? status : { status: 'idle' };
    return { available: state.status === 'results' && !!cohortRequest(state, 'csv'), status: current.status,
      format: current.format || '', message: current.message || '' };
  }

  async function post(body) {
    const cfg = controller.config || {};
    const abort = typeof AbortController === 'function' ? new AbortController() : null;
    const timer = abort ? setTimeout(() => abort.abort(), cfg.timeoutMs || 60000) : null;
    try {
      return await fetchImpl(joinUrl(cfg.apiRoot || '/api/v1', 'cohort'), {
        method: 'POST',
        headers: { Accept: body.format === 'csv' ? 'text/csv' : 'application/json',
          'Content-Type': 'application/json', ...(headers() || {}) },
        body: JSON.stringify(body),
        signal: abort?.signal,
        credentials: 'same-origin',
      });
    } finally {
      if (timer) {
        clearTimeout(timer);
      }
    }
  }

  /** Export the current results as 'csv' or 'kos'; resolves with the model when done. */
  async function run(format) {
    const state = controller.getState();
    const body = cohortRequest(state, format);
    if (!body || status.status === 'busy') {
      return model();
    }
    const mark = { seq: state.seq, response: state.response, format };
    set({ ...mark, status: 'busy', message: format === 'kos' ? 'Saving the cohort to the PACS…' : 'Preparing the CSV…' });
    const what = format === 'kos' ? 'Not saved to the PACS' : 'CSV not exported';
    let response;
    try {
      response = await post(body);
    } catch (error) {
      set({ ...mark, status: 'error', message: `${what}: the medsim server cannot be reached.` });
      return model();
    }
    if (!response.ok) {
      let reason = `HTTP ${response.status}`;
      try {
        reason = (await response.json())?.error?.message || reason;
      } catch (error) {
        // not a medsim error body (a proxy's page): the status says enough
      }
      set({ ...mark, status: 'error', message: `${what}: ${reason}` });
      return model();
    }
    try {
      if (format === 'csv') {
        download(await response.blob(), CSV_FILENAME);
        set({ ...mark, status: 'done', message: `Exported ${body.hits.length + 1} images (the query and its ` +
          `results) as ${CSV_FILENAME}.` });
      } else {
        set({ ...mark, status: 'done', message: savedMessage(await response.json()) });
      }
    } catch (error) {
      set({ ...mark, status: 'error', message: `${what}: ${error?.message || error}` });
    }
    return model();
  }

  return {
    model,
    run,
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
  };
}

function node(doc, tag, attrs = {}, children = []) {
  const element = doc.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) {
      continue;
    }
    if (name === 'text') {
      element.textContent = String(value);
    } else if (name === 'onClick') {
      element.addEventListener('click', value);
    } else if (name === 'className') {
      element.className = value;
    } else {
      element.setAttribute(name, value === true ? '' : String(value));
    }
  }
  children.filter(Boolean).forEach(child => element.appendChild(child));
  return element;
}

/** The export buttons and the status line for `cohort` (createCohortExport's model), or null. */
export function renderCohort(doc, cohort, actions) {
  if (!cohort || !cohort.available) {
    return null;
  }
  const busy = cohort.status === 'busy';
  const exportButton = (label, format, title) => node(doc, 'button', { type: 'button', className: 'medsim-button',
    'data-cy': `medsim-cohort-${format}`, disabled: busy, title, text: label,
    onClick: () => actions.exportCohort(format) });
  return node(doc, 'div', { className: 'medsim-cohort', 'data-cy': 'medsim-cohort', 'data-status': cohort.status }, [
    exportButton('Export cohort', 'csv', 'Download the query and these results as CSV (UIDs, rank, score, view, ' +
      'findings, patient pseudonym)'),
    exportButton('Save to PACS (KOS)', 'kos', 'Store the query and these results in the PACS as a DICOM Key ' +
      'Object Selection document in the query\'s study'),
    cohort.message
      ? node(doc, 'div', { className: `medsim-cohort-message medsim-cohort-${cohort.status}`,
        'data-cy': 'medsim-cohort-message', role: cohort.status === 'error' ? 'alert' : 'status',
        text: cohort.message })
      : null,
  ]);
}
