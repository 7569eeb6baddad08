// The panel's DOM (plugin/ohif/src/panel.js) drawn into a minimal fake DOM: node --test tests/plugin/
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { createController, ERROR_KINDS, panelModel, precheck, reducer, initialState } from '../../plugin/ohif/src/logic.js';
import { createPanelView, renderPanel } from '../../plugin/ohif/src/panel.js';
import { container } from './fake-dom.mjs';

const QUERY = { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', modality: 'CR', bodyPart: '' };
const OP = { mode: 'calibrated', k: 10, threshold: 0.857, target_recall: 0.9 };

function response(results, op = OP) {
  return { query: { study_uid: '2.25.1', sop_uid: '2.25.3', view: 'AP', indexed: true, patient: 'anon-q' },
    operating_point: op, group_by: 'study', include_same_patient: false, results, took_ms: 40 };
}

function settled(resp) {
  let state = reducer(initialState, { type: 'start', query: QUERY });
  return reducer(state, { type: 'succeeded', seq: state.seq, response: resp });
}

const noActions = { retry: () => {}, showAnyway: () => {} };

test('results: one item per case with thumbnail, score, findings, study details and links', () => {
  let state = settled(response([
    { rank: 1, score: 0.944, study_uid: '7.1', series_uid: '7.1.1', sop_uid: '7.1.1.1', patient: 'anon-a',
      labels: ['Pneumonia', 'Bacterial'], view: 'AP', matched_images: 2, thumbnail_url: '/api/v1/cases/7.1.1.1/thumbnail' },
    { rank: 2, score: 0.9, study_uid: '7.2', series_uid: '7.2.1', sop_uid: '7.2.1.1', patient: 'anon-b', labels: [],
      view: '', matched_images: 1, thumbnail_url: '' },
  ]));
  state = reducer(state, { type: 'studyInfo', studyUid: '7.1', info: { date: '20180105', description: 'CHEST 1 VIEW' } });
  state = reducer(state, { type: 'queryLabels', seq: state.seq, labels: ['Pneumonia'] });
  const root = container();
  renderPanel(root, panelModel(state, { origin: 'http://h', modeRoute: 'similar' }), noActions);
  const items = root.findAll('data-cy', 'medsim-result');
  assert.equal(items.length, 2);
  assert.equal(items[0].getAttribute('data-study-uid'), '7.1');
  assert.equal(items[0].getAttribute('data-findings'), 'Pneumonia|Bacterial');
  assert.equal(items[0].getAttribute('data-patient'), 'anon-a');
  assert.match(items[0].textContent, /#1/);
  assert.match(items[0].textContent, /0\.944/);
  assert.match(items[0].textContent, /2018-01-05 · CHEST 1 VIEW/);
  assert.match(items[0].textContent, /2 images matched/);
  const img = items[0].find('src');
  assert.equal(img.tagName, 'IMG');
  assert.equal(img.getAttribute('src'), '/api/v1/cases/7.1.1.1/thumbnail');
  const link = items[0].find('data-cy', 'medsim-open-study');
  assert.equal(link.getAttribute('href'), 'http://h/similar?StudyInstanceUIDs=7.1');
  assert.equal(link.getAttribute('target'), '_blank');
  assert.equal(link.getAttribute('rel'), 'noopener');
  assert.equal(items[0].findAll('class', 'medsim-chip medsim-chip-shared').length, 1, 'Pneumonia is shared');
  assert.match(items[1].textContent, /no findings recorded/);
  assert.match(items[1].textContent, /no preview/);
  assert.equal(root.find('data-cy', 'medsim-operating-point').textContent,
    'showing cases above the 90 %-recall threshold (similarity ≥ 0.857), at most 10');
  assert.match(root.find('data-cy', 'medsim-query').textContent, /findings: Pneumonia · view AP · indexed/);
  assert.match(root.textContent, /other patients only · best image per study · 40 ms/);
});

test('text from the server is never parsed as HTML', () => {
  const state = settled(response([{ rank: 1, score: 0.9, study_uid: '7.1', series_uid: '7.1.1', sop_uid: '7.1.1.1',
    labels: ['<img src=x onerror=alert(1)>'], thumbnail_url: '' }]));
  const root = container();
  renderPanel(root, panelModel(state), noActions);
  const chip = root.find('class', 'medsim-chip');
  assert.equal(chip.childNodes.length, 1);
  assert.equal(chip.childNodes[0].constructor.name, 'Text');
  assert.equal(chip.textContent, '<img src=x onerror=alert(1)>');
});

test('empty: the message names the threshold and the button asks for the top 10 anyway', () => {
  const state = settled(response([]));
  const root = container();
  let asked = 0;
  renderPanel(root, panelModel(state), { ...noActions, showAnyway: () => { asked += 1; } });
  assert.equal(root.find('data-state', 'empty').getAttribute('data-cy'), 'medsim-state');
  assert.match(root.textContent, /No case of another patient is above the 90 %-recall threshold/);
  const button = root.find('data-cy', 'medsim-show-anyway');
  assert.equal(button.textContent, 'Show top 10 anyway');
  button.click();
  assert.equal(asked, 1);
});

test('errors: kind, title, message; a retry button only where trying again can help', () => {
  for (const [error, retry] of [
    [{ kind: ERROR_KINDS.UNREACHABLE, title: 'medsim server unreachable', message: 'down', retry: true }, true],
    [{ kind: ERROR_KINDS.AUTH, title: 'Not authorised', message: 'no token', retry: false }, false],
    [precheck({ ...QUERY, modality: 'CT' }), false],
  ]) {
    let state = reducer(initialState, { type: 'start', query: QUERY });
    state = reducer(state, { type: 'failed', seq: state.seq, error });
    const root = container();
    let retried = 0;
    renderPanel(root, panelModel(state), { ...noActions, retry: () => { retried += 1; } });
    const box = root.find('data-state', 'error');
    assert.equal(box.getAttribute('data-error-kind'), error.kind);
    assert.equal(box.getAttribute('role'), 'alert');
    assert.match(box.textContent, new RegExp(error.title));
    const button = root.find('data-cy', 'medsim-retry');
    assert.equal(!!button, retry, error.kind);
    if (button) {
      button.click();
      assert.equal(retried, 1);
    }
  }
});

test('idle and loading', () => {
  const root = container();
  renderPanel(root, panelModel(initialState), noActions);
  assert.equal(root.find('data-cy', 'medsim-state').getAttribute('data-state'), 'idle');
  assert.equal(root.find('data-cy', 'medsim-refresh'), null);
  renderPanel(root, panelModel(reducer(initialState, { type: 'start', query: QUERY })), noActions);
  assert.equal(root.find('data-cy', 'medsim-state').getAttribute('data-state'), 'loading');
  assert.match(root.textContent, /Searching for similar cases/);
});

test('the view follows the controller while mounted and stops when unmounted', async () => {
  let answer = { status: 200, body: response([]) };
  const fetch = async () => ({ ok: answer.status < 300, status: answer.status, text: async () => JSON.stringify(answer.body) });
  const ctl = createController({ fetch });
  const view = createPanelView(ctl);
  const root = container();
  view.mount(root);
  assert.equal(root.find('data-cy', 'medsim-similar-panel').getAttribute('data-status'), 'idle');
  await ctl.find(QUERY);
  assert.equal(root.find('data-cy', 'medsim-similar-panel').getAttribute('data-status'), 'empty');
  view.unmount();
  answer = { status: 401, body: { error: { code: 'unauthorized' } } };
  await ctl.retry();
  assert.equal(root.find('data-cy', 'medsim-similar-panel').getAttribute('data-status'), 'empty', 'not redrawn');
  const again = container();
  view.mount(again);
  assert.equal(again.find('data-state', 'error').getAttribute('data-error-kind'), ERROR_KINDS.AUTH, 'state kept');
});
