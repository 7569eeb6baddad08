// Issue 15 in the panel: filter chips, the "where they match" overlays, the operating point's calibration size.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { calibrationText, createController, explainUrl, filtersFromChips, yearsBefore, initialState, panelModel,
  queryFromInstance, reducer, similarRequest, STATUS, undrawableReason } from '../../plugin/ohif/src/logic.js';
import { renderPanel } from '../../plugin/ohif/src/panel.js';
import { container } from './fake-dom.mjs';

const QUERY = { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', modality: 'CR', bodyPart: '' };
const OP = { mode: 'calibrated', k: 10, threshold: 0.857, target_recall: 0.9, source: 'stored operating point',
  calibrated_on: { queries: 16, patients: 16 }, model: 'vgg16-imagenet-gap',
  warning: 'calibrated on only 16 labeled queries (fewer than 200): the 90 % recall is a rough estimate' };
const PNG = 'data:image/png;base64,iVBORw0KGgo=';

function fakeFetch(routes) {
  const calls = [];
  const impl = async (url, init = {}) => {
    calls.push({ url, init, body: init.body ? JSON.parse(init.body) : undefined });
    const answer = await routes(url, init);
    const text = JSON.stringify(answer.body);
    return { ok: answer.status >= 200 && answer.status < 300, status: answer.status, text: async () => text };
  };
  impl.calls = calls;
  return impl;
}

function similarResponse(filters = {}) {
  return { query: { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', view: 'AP', indexed: true },
    operating_point: OP, model: { name: 'vgg16-imagenet-gap', fingerprint: 'f' }, group_by: 'study',
    include_same_patient: false, filters,
    results: [{ rank: 1, score: 0.9, study_uid: '7.1', series_uid: '7.1.1', sop_uid: '7.1.1.1', labels: ['Pneumonia'],
      view: 'AP', matched_images: 1, thumbnail_url: 'http://api/x.png' }] };
}

test('similarRequest carries the filters; chips map to the API filters object', () => {
  assert.deepEqual(similarRequest(QUERY, { filters: { view: 'lateral' } }).filters, { view: 'lateral' });
  assert.equal('filters' in similarRequest(QUERY, { filters: {} }), false);
  assert.deepEqual(filtersFromChips({ view: 'view-any', sex: 'sex-F' }), { view: 'any', sex: 'F' });
  assert.deepEqual(filtersFromChips({ findings: 'findings-query' }, ['Effusion']), { findings: { any: ['Effusion'] } });
  assert.deepEqual(filtersFromChips({ findings: 'findings-query' }, null), {});
  assert.equal(explainUrl('/api/v1', QUERY, '7.1.1.1'), '/api/v1/explain?query=2.25.3&hit=7.1.1.1&size=96');
  assert.match(explainUrl('/api/v1', QUERY, '7.1.1.1', { indexed: false }), /study_uid=2\.25\.1&series_uid=2\.25\.2$/);
});

test('the operating point says which model answered and how many queries calibrated it, with a warning', () => {
  assert.equal(calibrationText(OP, { name: 'vgg16-imagenet-gap' }),
    'model vgg16-imagenet-gap · threshold calibrated on 16 labeled queries (16 patients)');
  assert.equal(calibrationText({ mode: 'top-k', calibrated_on: null }, { name: 'm' }), 'model m');
});

test('controller: a chip searches again with its filter; the toggle fetches and draws overlays', async () => {
  const fetch = fakeFetch(url => {
    if (url.endsWith('/similar')) {
      return { status: 200, body: similarResponse() };
    }
    if (url.includes('/explain?')) {
      return { status: 200, body: { score: 0.9, hit: { overlay: PNG } } };
    }
    return { status: 200, body: { labels: ['Pneumonia'] } };
  });
  const ctl = createController({ fetch });
  assert.equal((await ctl.find(QUERY)).status, STATUS.RESULTS);
  await ctl.toggleChip('view-lateral');
  const similarCalls = fetch.calls.filter(c => c.url.endsWith('/similar'));
  assert.deepEqual(similarCalls.at(-1).body.filters, { view: 'lateral' });
  await ctl.toggleChip('view-lateral');  // off again
  assert.equal('filters' in fetch.calls.filter(c => c.url.endsWith('/similar')).at(-1).body, false);
  await ctl.toggleExplain();
  const model = ctl.model();
  assert.equal(model.explain, true);
  assert.equal(model.items[0].overlay, PNG);
  const root = container();
  renderPanel(root, model, { retry() {}, showAnyway() {}, toggleChip() {}, toggleExplain() {} });
  assert.equal(root.findAll('data-cy', 'medsim-overlay').length, 1);
  assert.equal(root.findAll('data-cy', 'medsim-filter-chip').length, 14);
  assert.match(root.findAll('data-cy', 'medsim-op-warning')[0].textContent, /16 labeled queries/);
  assert.match(root.findAll('data-cy', 'medsim-calibration')[0].textContent, /calibrated on 16/);
  await ctl.toggleExplain();
  assert.equal(ctl.model().items[0].overlay, '');
});

test('an image the viewer cannot draw (Deflated transfer syntax) gets a message, not just a black viewport', () => {
  const query = queryFromInstance({ StudyInstanceUID: '1', SeriesInstanceUID: '2', SOPInstanceUID: '3', Modality: 'CR',
    AvailableTransferSyntaxUID: '1.2.840.10008.1.2.1.99' });
  assert.equal(query.transferSyntax, '1.2.840.10008.1.2.1.99');
  assert.match(undrawableReason(query.transferSyntax), /Deflated Explicit VR Little Endian/);
  assert.equal(undrawableReason('1.2.840.10008.1.2.1'), '');
  const state = reducer(initialState, { type: 'start', query });
  const root = container();
  renderPanel(root, panelModel(state), { retry() {}, showAnyway() {}, toggleChip() {}, toggleExplain() {} });
  assert.match(root.findAll('data-cy', 'medsim-undrawable')[0].textContent, /cannot draw this image/);
  assert.equal('transferSyntax' in queryFromInstance({ SOPInstanceUID: '3' }), false);
  // known only from the API's answer (the query's file as indexed)
  let later = reducer(initialState, { type: 'start', query: queryFromInstance({ SOPInstanceUID: '3' }) });
  later = reducer(later, { type: 'succeeded', seq: later.seq, response: { query: { sop_uid: '3',
    transfer_syntax: '1.2.840.10008.1.2.1.99' }, results: [] } });
  assert.match(panelModel(later).undrawable, /Deflated/);
});

test('age, modality and study-date chips map to the API filters (one chip per group)', () => {
  const now = new Date(2026, 10, 30);
  assert.deepEqual(filtersFromChips({ age: 'age-40-64' }), { age: { min: 40, max: 64 } });
  assert.deepEqual(filtersFromChips({ age: 'age-65' }), { age: { min: 65 } });
  assert.deepEqual(filtersFromChips({ modality: 'modality-DX' }), { modality: 'DX' });
  assert.deepEqual(filtersFromChips({ study_date: 'date-1y' }, null, now), { study_date: { from: '2025-11-30' } });
  assert.deepEqual(filtersFromChips({ study_date: 'date-5y', sex: 'sex-F' }, null, now),
    { sex: 'F', study_date: { from: '2021-11-30' } });
  assert.equal(yearsBefore(new Date(2024, 1, 29), 1), '2023-03-01', 'no 29 February a year later: the next day');
});
