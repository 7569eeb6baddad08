// Cohort export in the panel (plugin/ohif/src/cohort.js): the request body, the CSV download and the KOS message,
// the refusals as the server words them, and the buttons in the panel.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { cohortRequest, createCohortExport, CSV_FILENAME } from '../../plugin/ohif/src/cohort.js';
import { initialState, reducer } from '../../plugin/ohif/src/logic.js';
import { createPanelView } from '../../plugin/ohif/src/panel.js';
import { container } from './fake-dom.mjs';

const QUERY = { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', modality: 'CR', bodyPart: '' };

function response(filters = {}) {
  return { query: { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', view: 'AP', indexed: true },
    operating_point: { mode: 'top-k', k: 2 }, group_by: 'study', include_same_patient: false, filters,
    results: [
      { rank: 1, score: 0.9, study_uid: '7.1', series_uid: '7.1.1', sop_uid: '7.1.1.1', labels: [], view: 'AP' },
      { rank: 2, score: 0.8, study_uid: '7.2', series_uid: '7.2.1', sop_uid: '7.2.1.1', labels: [], view: 'AP' },
    ] };
}

/** A controller stand-in: the state of logic.reducer, settled with `answer`. */
function fakeController(answer) {
  let state = reducer(initialState, { type: 'start', query: QUERY });
  state = reducer(state, { type: 'succeeded', seq: state.seq, response: answer });
  const listeners = new Set();
  return {
    config: { apiRoot: 'http://api/api/v1', timeoutMs: 1000 },
    getState: () => state,
    model: () => ({ status: state.status, items: [], chips: [], query: {} }),
    subscribe: fn => (listeners.add(fn), () => listeners.delete(fn)),
    dispatch(event) {
      state = reducer(state, event);
      listeners.forEach(fn => fn());
    },
  };
}

function fakeFetch(answer) {
  const calls = [];
  const impl = async (url, init) => {
    calls.push({ url, init, body: JSON.parse(init.body) });
    if (answer instanceof Error) {
      throw answer;
    }
    return { ok: answer.status < 300, status: answer.status, json: async () => answer.body,
      blob: async () => new Blob([answer.text || '']) };
  };
  impl.calls = calls;
  return impl;
}

test('cohortRequest: the query, the hits best first and the filters the list was made with', () => {
  const state = fakeController(response({ view: ['frontal'] })).getState();
  assert.deepEqual(cohortRequest(state, 'kos'), {
    query: { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3' }, hits: ['7.1.1.1', '7.2.1.1'],
    format: 'kos', filters: { view: ['frontal'] } });
  assert.equal('filters' in cohortRequest(fakeController(response()).getState(), 'csv'), false);
  assert.equal(cohortRequest(fakeController({ ...response(), results: [] }).getState(), 'csv'), null);
  assert.equal(cohortRequest(initialState, 'csv'), null);
});

test('CSV: posted to /cohort and handed to the download; the message says what was exported', async () => {
  const controller = fakeController(response());
  const fetch = fakeFetch({ status: 200, text: 'role,rank\n' });
  const saved = [];
  const cohort = createCohortExport({ controller, fetch, headers: () => ({ Authorization: 'Bearer t' }),
    download: (blob, name) => saved.push([blob, name]) });
  assert.equal(cohort.model().available, true);
  const model = await cohort.run('csv');
  assert.equal(fetch.calls[0].url, 'http://api/api/v1/cohort');
  assert.equal(fetch.calls[0].init.method, 'POST');
  assert.equal(fetch.calls[0].init.headers.Authorization, 'Bearer t');
  assert.equal(fetch.calls[0].body.format, 'csv');
  assert.equal(saved.length, 1);
  assert.equal(saved[0][1], CSV_FILENAME);
  assert.equal(await saved[0][0].text(), 'role,rank\n');
  assert.equal(model.status, 'done');
  assert.match(model.message, /Exported 3 images .* as medsim-cohort\.csv/);
});

test('KOS: the stored series is named; a refusal and an unreachable server give the reason', async () => {
  const controller = fakeController(response());
  const stored = { study_uid: '2.25.1', series_uid: '9.9', sop_uid: '9.9.1', references: 3,
    series_description: 'medsim cohort' };
  let model = await createCohortExport({ controller, fetch: fakeFetch({ status: 201, body: stored }) }).run('kos');
  assert.equal(model.status, 'done');
  assert.match(model.message, /^Saved to the PACS: series "medsim cohort" \(KO\) in the query's study, referencing 3/);

  const refused = { error: { status: 409, code: 'pacs-refused', message: 'the PACS refused the KOS: read only' } };
  model = await createCohortExport({ controller, fetch: fakeFetch({ status: 409, body: refused }) }).run('kos');
  assert.equal(model.status, 'error');
  assert.equal(model.message, 'Not saved to the PACS: the PACS refused the KOS: read only');

  model = await createCohortExport({ controller, fetch: fakeFetch(new TypeError('Failed to fetch')) }).run('csv');
  assert.equal(model.message, 'CSV not exported: the medsim server cannot be reached.');
});

test('a new search clears the message; the panel shows the two buttons and runs the export on click', async () => {
  const controller = fakeController(response());
  const fetch = fakeFetch({ status: 201, body: { references: 3 } });
  const cohort = createCohortExport({ controller, fetch });
  const root = container();
  createPanelView(controller, null, null, cohort).mount(root);
  assert.equal(root.find('data-cy', 'medsim-cohort-kos').textContent, 'Save to PACS (KOS)');
  assert.equal(root.find('data-cy', 'medsim-cohort-csv').textContent, 'Export cohort');
  root.find('data-cy', 'medsim-cohort-kos').click();
  await new Promise(resolve => setTimeout(resolve, 0));
  assert.match(root.find('data-cy', 'medsim-cohort-message').textContent, /^Saved to the PACS/);
  assert.equal(fetch.calls[0].body.format, 'kos');

  controller.dispatch({ type: 'start', query: QUERY });
  assert.equal(root.find('data-cy', 'medsim-cohort'), null, 'no export while searching');
  controller.dispatch({ type: 'succeeded', seq: controller.getState().seq, response: response() });
  assert.equal(root.find('data-cy', 'medsim-cohort').getAttribute('data-status'), 'idle');
  assert.equal(root.find('data-cy', 'medsim-cohort-message'), null);
});
