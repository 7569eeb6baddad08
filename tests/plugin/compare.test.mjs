// Issue 15, part 3: side by side that compares (compare.js). The pure parts, and the OHIF calls it makes against
// recording stand-ins of OHIF's services (the real viewer runs in tests/test_viewer_compare_browser.py).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { compareLabels, compareLayout, createCompare, findImage, HIT_VIEWPORT_ID, indexToWorld, LABEL_ITEM_ID,
  overlayTransform, QUERY_VIEWPORT_ID, relativeVoi, VOI_SYNC_ID, VOI_SYNC_TYPE } from '../../plugin/ohif/src/compare.js';
import { renderPanel } from '../../plugin/ohif/src/panel.js';
import { container } from './fake-dom.mjs';

const QUERY = { study_uid: '2.25.1', series_uid: '2.25.2', sop_uid: '2.25.3', modality: 'CR', bodyPart: '' };
const HIT = { rank: 3, scoreText: '0.910', score: 0.91, studyUid: '7.1', seriesUid: '7.1.1', sopUid: '7.1.1.2' };

test('labels: "query" and "#rank · score"', () => {
  assert.deepEqual(compareLabels(HIT), { query: 'query', hit: '#3 · 0.910' });
});

test('findImage: the display set holding the SOP instance and its index; unsupported or absent → null', () => {
  const sets = [
    { displaySetInstanceUID: 'a', instances: [{ SOPInstanceUID: '1.1' }] },
    { displaySetInstanceUID: 'b', instances: [{ SOPInstanceUID: '7.1.1.1' }, { SOPInstanceUID: '7.1.1.2' }] },
    { displaySetInstanceUID: 'c', unsupported: true, instances: [{ SOPInstanceUID: '9.9' }] },
  ];
  assert.deepEqual(findImage(sets, '7.1.1.2'), { displaySetInstanceUID: 'b', index: 1 });
  assert.equal(findImage(sets, '9.9'), null);
  assert.equal(findImage(sets, '5.5'), null);
  assert.equal(findImage(undefined, '1.1'), null);
});

test('compareLayout: one row of two stack viewports, query left, hit right, each at its image', () => {
  const layout = compareLayout({ displaySetInstanceUID: 'q', index: 0 }, { displaySetInstanceUID: 'h', index: 2 },
    { sync: true, hitViewportId: 'hit-7' });
  assert.equal(layout.numRows, 1);
  assert.equal(layout.numCols, 2);
  assert.equal(layout.activeViewportId, QUERY_VIEWPORT_ID);
  const [left, right] = [layout.findOrCreateViewport(0), layout.findOrCreateViewport(1)];
  assert.equal(layout.findOrCreateViewport(2), null);
  assert.deepEqual(left.displaySetInstanceUIDs, ['q']);
  assert.equal(left.viewportOptions.viewportId, QUERY_VIEWPORT_ID);
  assert.deepEqual(right.displaySetInstanceUIDs, ['h']);
  assert.equal(right.viewportOptions.viewportId, 'hit-7');
  assert.deepEqual(right.viewportOptions.initialImageOptions, { index: 2 });
  assert.deepEqual(right.viewportOptions.syncGroups,
    [{ type: VOI_SYNC_TYPE, id: VOI_SYNC_ID, source: true, target: true }]);
  assert.notEqual(layout.findOrCreateViewport(0), left, 'a fresh object per call (the grid writes into it)');
  const unsynced = compareLayout({ displaySetInstanceUID: 'q', index: 0 }, { displaySetInstanceUID: 'h', index: 0 });
  assert.deepEqual(unsynced.findOrCreateViewport(1).viewportOptions.syncGroups, []);
  assert.equal(unsynced.findOrCreateViewport(1).viewportOptions.viewportId, HIT_VIEWPORT_ID);
});

test('overlayTransform maps the overlay onto the drawn image: scale, offset, flip', () => {
  // a 200 x 100 image drawn at half size from (10, 20)
  assert.equal(overlayTransform([10, 20], [110, 20], [10, 70], 200, 100), 'matrix(0.5, 0, 0, 0.5, 10, 20)');
  // flipped horizontally: the top-left corner is drawn on the right
  assert.equal(overlayTransform([110, 20], [10, 20], [110, 70], 200, 100), 'matrix(-0.5, 0, 0, 0.5, 110, 20)');
  // rotated 90° clockwise
  assert.equal(overlayTransform([100, 0], [100, 200], [0, 0], 200, 100), 'matrix(0, 1, -1, 0, 100, 0)');
});

test('relativeVoi: a window change carried over relative to each image\'s initial window', () => {
  const from = { lower: 0, upper: 256 }; // an 8-bit image
  const to = { lower: 0, upper: 65536 }; // a 16-bit one
  assert.deepEqual(relativeVoi({ lower: 64, upper: 192 }, from, to), { lower: 16384, upper: 49152 });
  assert.deepEqual(relativeVoi(from, from, to), to, 'the initial window maps to the initial window');
  assert.deepEqual(relativeVoi({ lower: 10, upper: 20 }, to, to), { lower: 10, upper: 20 });
});

test('indexToWorld: origin + i·spacing·row direction + j·spacing·column direction', () => {
  const data = { origin: [1, 2, 3], spacing: [0.5, 2, 1], direction: [1, 0, 0, 0, 1, 0, 0, 0, 1] };
  assert.deepEqual(indexToWorld(data, -0.5, -0.5), [0.75, 1, 3]);
  assert.deepEqual(indexToWorld(data, 10, 4), [6, 10, 3]);
});

/** Recording stand-ins of the OHIF services compare.js calls. */
function fakeOhif({ loadedStudies = ['2.25.1'] } = {}) {
  const calls = [];
  const displaySets = [];
  const add = study => {
    if (study === '2.25.1') {
      displaySets.push({ displaySetInstanceUID: 'q', StudyInstanceUID: '2.25.1', instances: [{ SOPInstanceUID: '2.25.3' }] });
    } else if (study === '7.1') {
      displaySets.push({ displaySetInstanceUID: 'h', StudyInstanceUID: '7.1',
        instances: [{ SOPInstanceUID: '7.1.1.1' }, { SOPInstanceUID: '7.1.1.2' }] });
    }
  };
  loadedStudies.forEach(add);
  const customizations = { 'viewportOverlay.topLeft': [{ id: 'StudyDate' }] };
  const services = {
    displaySetService: { getActiveDisplaySets: () => displaySets },
    customizationService: {
      getCustomization: id => customizations[id],
      setCustomizations(change) {
        calls.push(['setCustomizations']);
        for (const [id, spec] of Object.entries(change)) {
          customizations[id] = [...spec.$unshift, ...customizations[id]];
        }
      },
    },
    viewportGridService: {
      async setLayout(layout) {
        const viewports = [0, 1, 2, 3].map(p => layout.findOrCreateViewport(p)).filter(Boolean);
        calls.push(['setLayout', layout.numRows, layout.numCols, viewports]);
      },
    },
    cornerstoneViewportService: { getCornerstoneViewport: id => ({ id, getRenderingEngine: () => ({ id: 'engine' }) }) },
    syncGroupService: {
      addViewportToSyncGroup: (id, engine, group) => calls.push(['addSync', id, engine, group.id]),
      removeViewportFromSyncGroup: (id, engine, groupId) => calls.push(['removeSync', id, engine, groupId]),
    },
  };
  const extensionManager = {
    getActiveDataSource: () => [{ retrieve: { series: { metadata: async ({ StudyInstanceUID }) => {
      calls.push(['retrieve', StudyInstanceUID]);
      setTimeout(() => add(StudyInstanceUID), 20); // display sets arrive after the metadata, as in OHIF
    } } } }],
  };
  return { calls, services, extensionManager, customizations };
}

function fakeController(query = QUERY) {
  const listeners = new Set();
  return {
    getState: () => ({ query, explain: false, response: { query: { indexed: true } } }),
    subscribe: listener => {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    config: { apiRoot: '/api/v1', timeoutMs: 1000 },
  };
}

const hostElement = (type, props) => ({ type, props });

test('open: loads the hit study through the data source, one 1 x 2 grid, labels by viewport; sync; close', async () => {
  const ohif = fakeOhif();
  const compare = createCompare({ controller: fakeController(), services: () => ohif.services,
    extensionManager: ohif.extensionManager, hostElement, fetch: async () => { throw new Error('no explain here'); } });
  const seen = [];
  compare.subscribe(state => seen.push(state.status));
  await compare.open(HIT);
  assert.deepEqual(seen, ['loading', 'on']);
  assert.deepEqual(ohif.calls.filter(c => c[0] === 'retrieve'), [['retrieve', '7.1']], 'only the study not loaded');
  const layouts = ohif.calls.filter(c => c[0] === 'setLayout');
  assert.equal(layouts.length, 1);
  const [, rows, cols, viewports] = layouts[0];
  assert.deepEqual([rows, cols, viewports.length], [1, 2, 2]);
  assert.deepEqual(viewports.map(v => v.displaySetInstanceUIDs[0]), ['q', 'h']);
  assert.equal(viewports[1].viewportOptions.initialImageOptions.index, 1);
  assert.deepEqual(compare.model(), { status: 'on', sync: false, message: '', rank: 3, label: '#3 · 0.910' });

  // the label item: first in the top-left overlay, drawn only in the compare viewports
  const [item] = ohif.customizations['viewportOverlay.topLeft'];
  assert.equal(item.id, LABEL_ITEM_ID);
  const hitId = viewports[1].viewportOptions.viewportId;
  assert.equal(item.condition({ viewportId: QUERY_VIEWPORT_ID }), true);
  assert.equal(item.condition({ viewportId: 'default' }), false);
  assert.equal(item.contentF({ viewportId: QUERY_VIEWPORT_ID }).props.children, 'query');
  assert.equal(item.contentF({ viewportId: hitId }).props.children, '#3 · 0.910');
  assert.equal(item.contentF({ viewportId: hitId }).props['data-cy'], 'medsim-compare-label');

  compare.setSync(true);
  assert.deepEqual(ohif.calls.filter(c => c[0] === 'addSync'),
    [['addSync', QUERY_VIEWPORT_ID, 'engine', VOI_SYNC_ID], ['addSync', hitId, 'engine', VOI_SYNC_ID]]);
  // another hit while open: the label item is not added twice, the new grid is synchronised from the start
  await compare.open({ ...HIT, rank: 1, scoreText: '0.950', sopUid: '7.1.1.1' });
  assert.equal(ohif.calls.filter(c => c[0] === 'setCustomizations').length, 1);
  const second = ohif.calls.filter(c => c[0] === 'setLayout')[1][3];
  assert.equal(second[1].viewportOptions.syncGroups[0].id, VOI_SYNC_ID);
  assert.equal(second[1].viewportOptions.initialImageOptions.index, 0);
  assert.equal(item.contentF({ viewportId: second[1].viewportOptions.viewportId }).props.children, '#1 · 0.950');

  await compare.close();
  assert.equal(compare.model().status, 'off');
  assert.deepEqual(ohif.calls.filter(c => c[0] === 'removeSync').map(c => c[1]),
    [QUERY_VIEWPORT_ID, second[1].viewportOptions.viewportId]);
  const last = ohif.calls.filter(c => c[0] === 'setLayout').at(-1);
  assert.deepEqual([last[1], last[2], last[3][0].displaySetInstanceUIDs], [1, 1, ['q']]);
  assert.equal(item.condition({ viewportId: QUERY_VIEWPORT_ID }), false, 'no label once closed');
});

test('open without a query does nothing; a study the PACS does not give is an error the panel shows', async () => {
  const ohif = fakeOhif();
  const idle = createCompare({ controller: fakeController(null), services: () => ohif.services,
    extensionManager: ohif.extensionManager, hostElement });
  await idle.open(HIT);
  assert.equal(idle.model().status, 'off');

  const broken = fakeOhif();
  broken.extensionManager.getActiveDataSource = () => [{ retrieve: { series: { metadata: async () => {
    throw new Error('PACS down');
  } } } }];
  const compare = createCompare({ controller: fakeController(), services: () => broken.services,
    extensionManager: broken.extensionManager, hostElement });
  await compare.open(HIT);
  assert.equal(compare.model().status, 'error');
  const root = container();
  renderPanel(root, { status: 'results', items: [], chips: [], compare: compare.model(), operatingPointText: '' },
    { compare: () => {} });
  const bar = root.find('data-cy', 'medsim-compare-bar');
  assert.equal(bar.getAttribute('data-status'), 'error');
  assert.match(bar.textContent, /could not load this study/);
});

test('the panel: a compare button per result, the bar with the label and the sync box while comparing', () => {
  const root = container();
  const calls = [];
  const item = { key: 'k', rank: 3, score: 0.91, scoreText: '0.910', findings: [], shared: [], studyUid: '7.1',
    sopUid: '7.1.1.2', openUrl: '#', patient: 'p' };
  const actions = { compare: it => calls.push(['compare', it.rank]), syncCompare: on => calls.push(['sync', on]),
    closeCompare: () => calls.push(['close']) };
  renderPanel(root, { status: 'results', items: [item], chips: [], operatingPointText: '',
    compare: { status: 'on', sync: true, rank: 3, label: '#3 · 0.910', message: '' } }, actions);
  root.find('data-cy', 'medsim-compare').click();
  assert.deepEqual(calls, [['compare', 3]]);
  const bar = root.find('data-cy', 'medsim-compare-bar');
  assert.match(bar.textContent, /Side by side: query \| #3 · 0\.910/);
  assert.equal(root.find('data-cy', 'medsim-compare-sync').getAttribute('checked'), '');
  root.find('data-cy', 'medsim-compare-close').click();
  assert.deepEqual(calls.at(-1), ['close']);
  // without a compare view (e.g. another host), no button and no bar
  const plain = container();
  renderPanel(plain, { status: 'results', items: [item], chips: [], operatingPointText: '' }, {});
  assert.equal(plain.find('data-cy', 'medsim-compare'), null);
  assert.equal(plain.find('data-cy', 'medsim-compare-bar'), null);
});

test('a layout changed by other means ends the comparison; the overlays explain the query compared, not a newer one',
  async () => {
    const ohif = fakeOhif();
    let onGrid = null;
    let gridViewports = new Map();
    Object.assign(ohif.services.viewportGridService, {
      EVENTS: { GRID_STATE_CHANGED: 'grid' },
      subscribe: (event, fn) => {
        onGrid = fn;
        return { unsubscribe() {} };
      },
      getState: () => ({ viewports: gridViewports }),
    });
    const urls = [];
    let panelState = { query: QUERY, explain: false, response: { query: { indexed: true } } };
    const listeners = new Set();
    const controller = { getState: () => panelState, subscribe: fn => listeners.add(fn),
      config: { apiRoot: '/api/v1', timeoutMs: 1000 } };
    const compare = createCompare({ controller, services: () => ohif.services, extensionManager: ohif.extensionManager,
      hostElement, fetch: async url => {
        urls.push(url);
        return { ok: false, status: 503, text: async () => '' };
      } });
    await compare.open(HIT);
    gridViewports = new Map([[QUERY_VIEWPORT_ID, {}]]);
    onGrid();
    assert.equal(compare.model().status, 'on', 'still on while its viewports are in the grid');
    // a new search for another image, then "where they match": the explanation is still for the compared query
    panelState = { ...panelState, query: { ...QUERY, sop_uid: '2.25.99' }, explain: true };
    listeners.forEach(fn => fn(panelState));
    await new Promise(resolve => setTimeout(resolve, 10));
    assert.match(urls[0], /query=2\.25\.3&hit=7\.1\.1\.2&size=512/);
    gridViewports = new Map([['default', {}]]);
    onGrid();
    assert.equal(compare.model().status, 'off');
  });

test('window/level sync: our synchronizer type, registered once, carries a change over relative to each window',
  async () => {
    const ohif = fakeOhif();
    const creators = {};
    const viewports = {};
    const viewport = (id, upper) => ({ id, getRenderingEngine: () => ({ id: 'engine' }), getImageData: () => ({}),
      properties: { voiRange: { lower: 0, upper } }, getProperties() { return this.properties; },
      setProperties(p) { this.properties = { ...this.properties, ...p }; }, render() {} });
    ohif.services.cornerstoneViewportService.getCornerstoneViewport = id => {
      viewports[id] ||= viewport(id, id === QUERY_VIEWPORT_ID ? 256 : 65536);
      return viewports[id];
    };
    Object.assign(ohif.services.syncGroupService, {
      getSyncCreatorForType: type => creators[type],
      addSynchronizerType: (type, creator) => { creators[type] = creator; },
    });
    globalThis.cornerstoneTools = { SynchronizerManager: { createSynchronizer: (id, event, handler) => ({ id, event,
      handler }) } };
    try {
      const compare = createCompare({ controller: fakeController(), services: () => ohif.services,
        extensionManager: ohif.extensionManager, hostElement });
      compare.setSync(true);
      await compare.open(HIT);
      await compare.open(HIT);
      assert.deepEqual(Object.keys(creators), [VOI_SYNC_TYPE], 'registered once');
      const layout = ohif.calls.filter(c => c[0] === 'setLayout').at(-1)[3];
      assert.equal(layout[0].viewportOptions.syncGroups[0].type, VOI_SYNC_TYPE);
      const hitId = layout[1].viewportOptions.viewportId;
      await new Promise(resolve => setTimeout(resolve, 150)); // the initial windows are read once drawn
      const sync = creators[VOI_SYNC_TYPE](VOI_SYNC_ID);
      assert.equal(sync.event, 'CORNERSTONE_VOI_MODIFIED');
      sync.handler(sync, { viewportId: QUERY_VIEWPORT_ID }, { viewportId: hitId },
        { detail: { range: { lower: 64, upper: 192 } } });
      assert.deepEqual(viewports[hitId].properties.voiRange, { lower: 16384, upper: 49152 });
    } finally {
      delete globalThis.cornerstoneTools;
    }
  });
