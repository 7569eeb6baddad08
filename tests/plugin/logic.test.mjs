// Unit tests of the plugin's logic (plugin/ohif/src/logic.js): node --test tests/plugin/
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  ApiFailure, ERROR_KINDS, STATUS, classifyFailure, createController, fetchJson, fixVoiLutFunction, formatDicomDate,
  hasThreshold, initialState, operatingPointText, panelModel, precheck, qidoStudyUrl, queryFromInstance, reducer,
  similarRequest, studyInfoFromQido, studyUrl, toViewModel,
} from '../../plugin/ohif/src/logic.js';

const QUERY = { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', modality: 'CR', bodyPart: 'CHEST' };
const CALIBRATED = { mode: 'calibrated', k: 10, threshold: 0.857, target_recall: 0.9, source: 'stored operating point' };

function row(rank, study, labels, extra = {}) {
  return { rank, score: 0.95 - rank / 100, study_uid: study, series_uid: `${study}.1`, sop_uid: `${study}.1.1`,
    patient: `anon-${study}`, labels, view: 'AP', matched_images: 1,
    thumbnail_url: `/api/v1/cases/${study}.1.1/thumbnail`, viewer_url: `/viewer?StudyInstanceUIDs=${study}`, ...extra };
}

function similarResponse(results, op = CALIBRATED, query = {}) {
  return { query: { study_uid: QUERY.study_uid, series_uid: QUERY.series_uid, sop_uid: QUERY.sop_uid, view: 'AP',
    indexed: true, source: 'index', patient: 'anon-q', ...query }, operating_point: op, group_by: 'study',
  include_same_patient: false, model: { name: 'm', fingerprint: 'f' }, results, took_ms: 12.5 };
}

/** A fake fetch: routes(url, init) -> {status, body} | Error (thrown) | a Promise of either; records calls. */
function fakeFetch(routes) {
  const calls = [];
  const impl = async (url, init = {}) => {
    calls.push({ url, init, body: init.body ? JSON.parse(init.body) : undefined });
    const answer = await routes(url, init, calls.length);
    if (answer instanceof Error) {
      throw answer;
    }
    const text = answer.raw !== undefined ? answer.raw : (answer.body === undefined ? '' : JSON.stringify(answer.body));
    return { ok: answer.status >= 200 && answer.status < 300, status: answer.status, text: async () => text };
  };
  impl.calls = calls;
  return impl;
}

// ---- query -----------------------------------------------------------------------------------------------------------

test('queryFromInstance takes the UIDs and modality of the displayed instance', () => {
  const query = queryFromInstance({ StudyInstanceUID: '1.2', SeriesInstanceUID: '1.2.3', SOPInstanceUID: '1.2.3.4',
    Modality: 'dx', BodyPartExamined: 'Chest' });
  assert.deepEqual(query, { study_uid: '1.2', series_uid: '1.2.3', sop_uid: '1.2.3.4', modality: 'DX', bodyPart: 'CHEST' });
});

test('queryFromInstance falls back to the display set and refuses instances without a SOP UID', () => {
  const query = queryFromInstance({ SOPInstanceUID: '9.9' }, { StudyInstanceUID: '9', SeriesInstanceUID: '9.1', Modality: 'CR' });
  assert.equal(query.study_uid, '9');
  assert.equal(query.modality, 'CR');
  assert.equal(queryFromInstance({ StudyInstanceUID: '1' }), null);
  assert.equal(queryFromInstance(null), null);
  assert.equal(queryFromInstance({ SOPInstanceUID: ['5.5'], Modality: ['CR'] }).sop_uid, '5.5');
});

test('precheck: no image, and modalities that are never radiographs, fail before any request', () => {
  assert.equal(precheck(null).kind, ERROR_KINDS.NO_IMAGE);
  const ct = precheck({ ...QUERY, modality: 'CT', bodyPart: 'CHEST' });
  assert.equal(ct.kind, ERROR_KINDS.NOT_CHEST);
  assert.match(ct.message, /CT/);
  assert.equal(precheck(QUERY), null);
  assert.equal(precheck({ ...QUERY, modality: 'DX' }), null);
  assert.equal(precheck({ ...QUERY, modality: '' }), null, 'unknown modality: the server decides');
});

test('similarRequest: the default uses the server operating point, "show anyway" asks for the plain top k', () => {
  assert.deepEqual(similarRequest(QUERY), { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3' });
  assert.deepEqual(similarRequest(QUERY, { showAnyway: true, k: 10 }),
    { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', threshold: 'none', k: 10 });
});

// ---- HTTP and failures -----------------------------------------------------------------------------------------------

test('fetchJson sends JSON with the given headers and parses the answer', async () => {
  const fetch = fakeFetch(() => ({ status: 200, body: { ok: 1 } }));
  const body = await fetchJson(fetch, '/api/v1/similar', { method: 'POST', body: { a: 1 },
    headers: { Authorization: 'Bearer t' } });
  assert.deepEqual(body, { ok: 1 });
  const { init } = fetch.calls[0];
  assert.equal(init.method, 'POST');
  assert.equal(init.headers['Content-Type'], 'application/json');
  assert.equal(init.headers.Authorization, 'Bearer t');
  assert.equal(init.credentials, 'same-origin');
});

test('fetchJson rejects with ApiFailure: HTTP errors keep status and JSON error, network errors have status 0', async () => {
  const err = { error: { status: 422, code: 'not-chest-radiograph', message: 'not a chest radiograph (modality CT)' } };
  await assert.rejects(fetchJson(fakeFetch(() => ({ status: 422, body: err })), '/x'),
    e => e instanceof ApiFailure && e.status === 422 && e.body.error.code === 'not-chest-radiograph');
  await assert.rejects(fetchJson(fakeFetch(() => new TypeError('Failed to fetch')), '/x'),
    e => e instanceof ApiFailure && e.status === 0 && e.networkError.message === 'Failed to fetch');
  await assert.rejects(fetchJson(fakeFetch(() => ({ status: 502, raw: '<html>Bad gateway</html>' })), '/x'),
    e => e.status === 502 && e.body === null);
  await assert.rejects(fetchJson(fakeFetch(() => ({ status: 200, raw: 'not json' })), '/x'), e => e instanceof ApiFailure);
});

test('fetchJson times out into an ApiFailure marked timedOut', async () => {
  const hanging = (url, init) => new Promise((resolve, reject) => {
    init.signal.addEventListener('abort', () => reject(Object.assign(new Error('aborted'), { name: 'AbortError' })));
  });
  await assert.rejects(fetchJson(hanging, '/x', { timeoutMs: 20 }), e => e.status === 0 && e.timedOut === true);
});

test('classifyFailure maps each failure onto one of the panel states', () => {
  const cases = [
    [{ status: 0 }, ERROR_KINDS.UNREACHABLE, true],
    [{ status: 0, timedOut: true }, ERROR_KINDS.UNREACHABLE, true],
    [{ status: 401, body: { error: { code: 'unauthorized', message: 'invalid bearer token' } } }, ERROR_KINDS.AUTH, false],
    [{ status: 403, body: null }, ERROR_KINDS.AUTH, false],
    [{ status: 422, body: { error: { code: 'not-chest-radiograph', message: 'not a chest radiograph' } } }, ERROR_KINDS.NOT_CHEST, false],
    [{ status: 422, body: { error: { code: 'not-an-image', message: 'no pixel data' } } }, ERROR_KINDS.NOT_CHEST, false],
    [{ status: 404, body: { error: { code: 'not-found', message: 'not in the PACS' } } }, ERROR_KINDS.NOT_FOUND, false],
    [{ status: 502, body: { error: { code: 'pacs-unavailable', message: 'PACS down' } } }, ERROR_KINDS.PACS, true],
    [{ status: 504, body: { error: { code: 'pacs-timeout', message: 'PACS slow' } } }, ERROR_KINDS.PACS, true],
    [{ status: 502, body: null }, ERROR_KINDS.UNREACHABLE, true],
    [{ status: 503, body: null }, ERROR_KINDS.UNREACHABLE, true],
    [{ status: 400, body: { error: { code: 'invalid-uid', message: 'bad uid' } } }, ERROR_KINDS.BAD_REQUEST, false],
    [{ status: 500, body: { error: { code: 'internal-error', message: 'boom', request_id: 'r1' } } }, ERROR_KINDS.SERVER, true],
  ];
  for (const [failure, kind, retry] of cases) {
    const state = classifyFailure(failure);
    assert.equal(state.kind, kind, JSON.stringify(failure));
    assert.equal(state.retry, retry, JSON.stringify(failure));
    assert.ok(state.title && state.message, 'every state has a title and a message');
  }
  assert.match(classifyFailure({ status: 500, body: { error: { message: 'boom', request_id: 'r1' } } }).message, /r1/);
});

// ---- view model ------------------------------------------------------------------------------------------------------

test('operatingPointText names the operating point used', () => {
  assert.equal(operatingPointText(CALIBRATED),
    'showing cases above the 90 %-recall threshold (similarity ≥ 0.857), at most 10');
  assert.equal(operatingPointText({ mode: 'target_recall', k: 5, threshold: 0.8, target_recall: 0.955 }),
    'showing cases above the 95.5 %-recall threshold (similarity ≥ 0.800), at most 5');
  assert.equal(operatingPointText({ mode: 'threshold', k: 10, threshold: 0.9 }),
    'showing cases with similarity ≥ 0.900, at most 10');
  assert.equal(operatingPointText({ mode: 'top-k', k: 10, source: 'request (threshold: none)' }),
    'showing the top 10 cases, regardless of threshold');
  assert.equal(operatingPointText({ mode: 'top-k', k: 10, source: 'index not calibrated' }),
    'showing the top 10 cases (the index has no calibrated threshold)');
  assert.equal(operatingPointText(null), '');
  assert.equal(hasThreshold(CALIBRATED), true);
  assert.equal(hasThreshold({ mode: 'top-k', k: 10 }), false);
});

test('formatDicomDate and studyUrl', () => {
  assert.equal(formatDicomDate('20180105'), '2018-01-05');
  assert.equal(formatDicomDate(''), '');
  assert.equal(formatDicomDate('2018'), '2018');
  assert.equal(studyUrl('1.2', { origin: 'http://h:8000', modeRoute: 'similar' }),
    'http://h:8000/similar?StudyInstanceUIDs=1.2');
  assert.equal(studyUrl(['1.2', '3.4'], { routerBasename: '/ohif/' }), '/ohif/similar?StudyInstanceUIDs=1.2%2C3.4');
  assert.equal(studyUrl('1.2', { token: 'abc' }), '/similar?StudyInstanceUIDs=1.2&token=abc');
});

test('toViewModel: thumbnail, score, findings (shared with the query marked), study details, links', () => {
  const response = similarResponse([row(1, '7.1', ['Pneumonia', 'Bacterial']), row(2, '7.2', [])]);
  const view = toViewModel(response, { studies: { 7.1: { date: '20180105', description: 'CHEST 1 VIEW' } },
    queryLabels: ['Pneumonia', 'Bacterial'], urls: { origin: 'http://h', modeRoute: 'similar' } });
  assert.equal(view.items.length, 2);
  const [first, second] = view.items;
  assert.equal(first.scoreText, '0.940');
  assert.deepEqual(first.findings, ['Pneumonia', 'Bacterial']);
  assert.deepEqual(first.shared, ['Pneumonia', 'Bacterial']);
  assert.equal(first.date, '2018-01-05');
  assert.equal(first.description, 'CHEST 1 VIEW');
  assert.equal(first.thumbnailUrl, '/api/v1/cases/7.1.1.1/thumbnail');
  assert.equal(first.openUrl, 'http://h/similar?StudyInstanceUIDs=7.1');
  assert.equal(second.findingsText, 'no findings recorded');
  assert.equal(second.date, '');
  assert.equal(view.operatingPointText.startsWith('showing cases above the 90 %-recall threshold'), true);
  assert.equal(view.query.indexed, true);
});

test('QIDO study look-up: repeated includefield, DICOM JSON parsed', () => {
  const url = qidoStudyUrl('http://h/dicom-web/', '1.2.3');
  assert.equal(url, 'http://h/dicom-web/studies?StudyInstanceUID=1.2.3&includefield=00080020&includefield=00081030');
  const answer = [{ '0020000D': { vr: 'UI', Value: ['1.2.3'] }, '00080020': { vr: 'DA', Value: ['20180112'] },
    '00081030': { vr: 'LO', Value: ['CHEST 1 VIEW'] } }];
  assert.deepEqual(studyInfoFromQido(answer, '1.2.3'), { date: '20180112', description: 'CHEST 1 VIEW' });
  assert.deepEqual(studyInfoFromQido([{ '0020000D': { Value: ['1.2.3'] } }], '1.2.3'), { date: '', description: '' });
  assert.equal(studyInfoFromQido([], '1.2.3'), null);
});

test('fixVoiLutFunction wraps a VOILUTFunction string in a list and leaves the rest alone', () => {
  const instances = [{ VOILUTFunction: 'LINEAR' }, { VOILUTFunction: ['SIGMOID'] }, {}, null, { VOILUTFunction: '' }];
  assert.equal(fixVoiLutFunction(instances), 1);
  assert.deepEqual(instances[0].VOILUTFunction, ['LINEAR']);
  assert.deepEqual(instances[1].VOILUTFunction, ['SIGMOID']);
  assert.equal(fixVoiLutFunction(instances), 0, 'idempotent');
  assert.equal(fixVoiLutFunction(undefined), 0);
});

// ---- state machine ---------------------------------------------------------------------------------------------------

test('reducer: start → loading → results; stale answers are dropped', () => {
  let state = reducer(initialState, { type: 'start', query: QUERY });
  assert.equal(state.status, STATUS.LOADING);
  const first = state.seq;
  state = reducer(state, { type: 'start', query: QUERY });
  const stale = reducer(state, { type: 'succeeded', seq: first, response: similarResponse([row(1, '7.1', [])]) });
  assert.equal(stale, state, 'an answer to an older request changes nothing');
  state = reducer(state, { type: 'succeeded', seq: state.seq, response: similarResponse([row(1, '7.1', [])]) });
  assert.equal(state.status, STATUS.RESULTS);
  assert.equal(reducer(state, { type: 'failed', seq: state.seq, error: {} }), state, 'settled states ignore late failures');
});

test('reducer: empty answer, failure, precheck, study details, query labels, reset', () => {
  let state = reducer(initialState, { type: 'start', query: QUERY });
  state = reducer(state, { type: 'succeeded', seq: state.seq, response: similarResponse([]) });
  assert.equal(state.status, STATUS.EMPTY);
  state = reducer(state, { type: 'studyInfo', studyUid: '7.1', info: { date: '20180105' } });
  assert.equal(state.studies['7.1'].date, '20180105');
  state = reducer(state, { type: 'queryLabels', seq: state.seq, labels: ['No Finding'] });
  assert.deepEqual(state.queryLabels, ['No Finding']);
  state = reducer(state, { type: 'start', query: QUERY, showAnyway: true });
  assert.deepEqual(state.queryLabels, ['No Finding'], 'same query: its labels are kept');
  assert.equal(state.studies['7.1'].date, '20180105', 'study details are kept across searches');
  state = reducer(state, { type: 'failed', seq: state.seq, error: { kind: ERROR_KINDS.UNREACHABLE } });
  assert.equal(state.status, STATUS.ERROR);
  state = reducer(state, { type: 'precheckFailed', query: null, error: precheck(null) });
  assert.equal(state.error.kind, ERROR_KINDS.NO_IMAGE);
  state = reducer(state, { type: 'reset' });
  assert.equal(state.status, STATUS.IDLE);
  assert.equal(reducer(state, { type: 'unknown' }), state);
});

test('panelModel: an empty answer cut by the threshold offers "show top 10 anyway", once', () => {
  let state = reducer(initialState, { type: 'start', query: QUERY });
  state = reducer(state, { type: 'succeeded', seq: state.seq, response: similarResponse([]) });
  let model = panelModel(state);
  assert.equal(model.offerShowAnyway, true);
  assert.match(model.emptyMessage, /90 %-recall threshold/);
  state = reducer(state, { type: 'start', query: QUERY, showAnyway: true });
  state = reducer(state, { type: 'succeeded', seq: state.seq,
    response: similarResponse([], { mode: 'top-k', k: 10, source: 'request (threshold: none)' }) });
  model = panelModel(state);
  assert.equal(model.offerShowAnyway, false);
  assert.match(model.emptyMessage, /no case of another patient/);
});

// ---- controller ------------------------------------------------------------------------------------------------------

test('controller: find → results, then the query findings and study details are filled in', async () => {
  const fetch = fakeFetch(url => {
    if (url === '/api/v1/similar') {
      return { status: 200, body: similarResponse([row(1, '7.1', ['Pneumonia']), row(2, '7.2', ['No Finding'])]) };
    }
    if (url === '/api/v1/cases/2.25.3') {
      return { status: 200, body: { labels: ['Pneumonia', 'Bacterial'] } };
    }
    return { status: 404, body: { error: { code: 'not-found' } } };
  });
  const seen = [];
  const searched = [];
  const ctl = createController({ fetch, config: { origin: 'http://h' }, authHeaders: () => ({ Authorization: 'Bearer tok' }),
    searchStudy: async uid => { searched.push(uid); return { date: '20180105', description: `study ${uid}` }; } });
  ctl.subscribe(state => seen.push(state.status));
  const state = await ctl.find(QUERY);
  assert.equal(state.status, STATUS.RESULTS);
  assert.deepEqual(seen.slice(0, 2), [STATUS.LOADING, STATUS.RESULTS]);
  assert.deepEqual(fetch.calls[0].body, { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3' });
  assert.equal(fetch.calls[0].init.headers.Authorization, 'Bearer tok');
  assert.deepEqual(searched.sort(), ['7.1', '7.2']);
  const model = ctl.model();
  assert.deepEqual(model.query.findings, ['Pneumonia', 'Bacterial']);
  assert.deepEqual(model.items[0].shared, ['Pneumonia']);
  assert.equal(model.items[0].description, 'study 7.1');
  assert.equal(model.items[0].openUrl, 'http://h/similar?StudyInstanceUIDs=7.1');
});

test('controller: nothing above the threshold, then "show top 10 anyway" asks for the plain top 10', async () => {
  const fetch = fakeFetch((url, init, n) => (url.endsWith('/similar')
    ? { status: 200, body: n === 1 ? similarResponse([]) : similarResponse([row(1, '7.1', [])], { mode: 'top-k', k: 10 }) }
    : { status: 404, body: {} }));
  const ctl = createController({ fetch });
  assert.equal((await ctl.find(QUERY)).status, STATUS.EMPTY);
  assert.equal(ctl.model().offerShowAnyway, true);
  const state = await ctl.showAnyway();
  assert.equal(state.status, STATUS.RESULTS);
  assert.deepEqual(fetch.calls.filter(c => c.url.endsWith('/similar'))[1].body,
    { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', threshold: 'none', k: 10 });
});

test('controller: server down, auth failure, not a chest radiograph; retry goes to the server again', async () => {
  let answer = new TypeError('Failed to fetch');
  const fetch = fakeFetch(() => answer);
  const ctl = createController({ fetch });
  let state = await ctl.find(QUERY);
  assert.equal(state.error.kind, ERROR_KINDS.UNREACHABLE);
  answer = { status: 401, body: { error: { code: 'unauthorized', message: 'this API needs a token' } } };
  state = await ctl.retry();
  assert.equal(state.error.kind, ERROR_KINDS.AUTH);
  answer = { status: 422, body: { error: { code: 'not-chest-radiograph', message: 'not a chest radiograph: CT' } } };
  state = await ctl.retry();
  assert.equal(state.error.kind, ERROR_KINDS.NOT_CHEST);
  assert.equal(fetch.calls.length, 3);
  state = await ctl.find({ ...QUERY, modality: 'MR' });
  assert.equal(state.error.kind, ERROR_KINDS.NOT_CHEST);
  assert.equal(fetch.calls.length, 3, 'the precheck asks nobody');
});

test('controller: a slow answer to an old query never replaces the current one', async () => {
  let release;
  const slow = new Promise(resolve => { release = resolve; });
  const fetch = fakeFetch((url, init, n) => (n === 1 ? slow : { status: 200, body: similarResponse([row(1, 'new', [])]) }));
  const ctl = createController({ fetch });
  const first = ctl.find(QUERY);
  await ctl.find({ ...QUERY, sop_uid: '2.25.99' });
  release({ status: 200, body: similarResponse([row(1, 'old', [])]) });
  await first;
  assert.equal(ctl.getState().response.results[0].study_uid, 'new');
});

test('controller: study look-up failures leave the results standing; listeners that throw do not break others', async () => {
  const fetch = fakeFetch(url => (url.endsWith('/similar') ? { status: 200, body: similarResponse([row(1, '7.1', [])]) }
    : new TypeError('down')));
  const ctl = createController({ fetch, searchStudy: async () => { throw new Error('QIDO down'); } });
  const statuses = [];
  const originalError = console.error;
  console.error = () => {};
  try {
    ctl.subscribe(() => { throw new Error('bad listener'); });
    ctl.subscribe(state => statuses.push(state.status));
    const state = await ctl.find(QUERY);
    assert.equal(state.status, STATUS.RESULTS);
    assert.equal(ctl.model().items[0].date, '');
    assert.ok(statuses.includes(STATUS.RESULTS));
  } finally {
    console.error = originalError;
  }
});
