/**
 * Side by side that compares: the query image left, a hit right, in one row (1 × 2) of the viewer that is open,
 * labelled "query" and "#3 · 0.910", window/level synchronised on request, and "where they match" drawn on both
 * images while the panel's toggle is on. Nothing navigates, so the panel stays open with its results.
 *
 * OHIF's own services do the work: the active data source loads the hit's study into the viewer (as OHIF's study
 * browser does), viewportGridService.setLayout puts the two images in a 1 × 2 grid, a viewportOverlay.topLeft
 * customization writes the labels, syncGroupService links window/level. The sync is a synchronizer type of our own,
 * registered with that service: it carries a window/level change over *relative to each image's initial window*,
 * since two radiographs rarely share a pixel scale (8-bit against 16-bit, CR against DX); OHIF's "voi" type copies
 * the values and is the fallback when cornerstone's tools are not reachable. OHIF's "@ohif/hpCompare" hanging
 * protocol is not used: with two single-image studies it opens its 2 × 2 stage with an empty bottom row and does not
 * say which image is the query. The overlays are <img> elements over the cornerstone canvas, placed with the
 * viewport's own worldToCanvas and moved with its camera (zoom, pan, flip).
 *
 * The pure parts (labels, which image, the grid, the window mapping, the overlay's placement) are exported for
 * `node --test`.
 */

import { explainUrl, fetchJson } from './logic.js';

export const QUERY_VIEWPORT_ID = 'medsim-compare-query';
export const HIT_VIEWPORT_ID = 'medsim-compare-hit';
export const VOI_SYNC_ID = 'medsimCompareVoi';
export const VOI_SYNC_TYPE = 'medsimrelativevoi';
export const LABEL_ITEM_ID = 'medsimCompareLabel';
/** Longest side of the viewport overlays (the thumbnails' are 96 px). */
export const OVERLAY_SIZE = 512;
// cornerstone3D's event names (Enums.Events), as strings: the plugin has no cornerstone import
const VOI_MODIFIED = 'CORNERSTONE_VOI_MODIFIED';
const CAMERA_MODIFIED = 'CORNERSTONE_CAMERA_MODIFIED';
const IMAGE_RENDERED = 'CORNERSTONE_IMAGE_RENDERED';

// ---- pure ---------------------------------------------------------------------------------------------------------

/** The two viewport labels for a panel item (logic.toViewModel): {query: 'query', hit: '#3 · 0.910'}. */
export function compareLabels(item) {
  return { query: 'query', hit: `#${item.rank} · ${item.scoreText}` };
}

function sopOf(instance) {
  const value = instance?.SOPInstanceUID;
  return String(Array.isArray(value) ? value[0] : value ?? '');
}

/** The display set that holds the instance `sopUid` and its index in it, or null (not loaded, or no such image). */
export function findImage(displaySets, sopUid) {
  for (const displaySet of displaySets || []) {
    const instances = displaySet?.instances || (displaySet?.instance ? [displaySet.instance] : []);
    const index = instances.findIndex(instance => sopOf(instance) === sopUid);
    if (index >= 0 && !displaySet.unsupported) {
      return { displaySetInstanceUID: displaySet.displaySetInstanceUID, index };
    }
  }
  return null;
}

/** The sync group of the two viewports (`type`: VOI_SYNC_TYPE, or OHIF's 'voi' when ours is not registered). */
export function voiSyncGroup(type = VOI_SYNC_TYPE) {
  return { type, id: VOI_SYNC_ID, source: true, target: true };
}

/**
 * A window/level range of one image carried over to another, relative to their initial windows: the same place
 * and width as fractions of the initial window (`from`: the source image's, `to`: the target's).
 */
export function relativeVoi(range, from, to) {
  const scale = (to.upper - to.lower) / ((from.upper - from.lower) || 1);
  return { lower: to.lower + (range.lower - from.lower) * scale, upper: to.lower + (range.upper - from.lower) * scale };
}

/** One viewport of the compare grid (what viewportGridService.setLayout's findOrCreateViewport returns). */
export function compareViewport(viewportId, image, { sync = false, syncType = VOI_SYNC_TYPE } = {}) {
  return {
    displaySetInstanceUIDs: [image.displaySetInstanceUID],
    displaySetOptions: [{}],
    viewportOptions: {
      viewportId,
      viewportType: 'stack',
      toolGroupId: 'default',
      initialImageOptions: { index: image.index },
      syncGroups: sync ? [voiSyncGroup(syncType)] : [],
    },
  };
}

/**
 * The arguments of viewportGridService.setLayout for query | hit in one row. `hitViewportId` changes with each hit
 * (React remounts the viewport, so its label and overlay start fresh).
 */
export function compareLayout(queryImage, hitImage, { sync = false, syncType = VOI_SYNC_TYPE,
  hitViewportId = HIT_VIEWPORT_ID } = {}) {
  const viewports = [compareViewport(QUERY_VIEWPORT_ID, queryImage, { sync, syncType }),
    compareViewport(hitViewportId, hitImage, { sync, syncType })];
  return {
    numRows: 1,
    numCols: 2,
    // the query's stays the active viewport: what the panel and "Find similar cases" are about
    activeViewportId: QUERY_VIEWPORT_ID,
    // a fresh object per call: the grid's reducer writes into what it gets
    findOrCreateViewport: position => (viewports[position] ? structuredClone(viewports[position]) : null),
  };
}

/**
 * The CSS transform that lays an element of `width` × `height` px (transform-origin 0 0) on the image whose
 * top-left, top-right and bottom-left pixel corners are drawn at the canvas points p0, p1, p2: an affine map, so
 * zoom, pan, flips and rotation are followed.
 */
export function overlayTransform(p0, p1, p2, width, height) {
  const n = value => Number(value.toFixed(4));
  const a = (p1[0] - p0[0]) / width;
  const b = (p1[1] - p0[1]) / width;
  const c = (p2[0] - p0[0]) / height;
  const d = (p2[1] - p0[1]) / height;
  return `matrix(${[a, b, c, d, p0[0], p0[1]].map(n).join(', ')})`;
}

/** World point of the image index (i, j) (fractional: -0.5 is a pixel's outer edge) from cornerstone's image data. */
export function indexToWorld({ origin, spacing, direction }, i, j) {
  return [0, 1, 2].map(axis => origin[axis] + i * spacing[0] * direction[axis] + j * spacing[1] * direction[3 + axis]);
}

// ---- OHIF ---------------------------------------------------------------------------------------------------------

/** Polls `check` until it gives a value; gives up after `timeoutMs`, or as soon as `wanted()` is false (the
 * comparison it serves has ended: no timer is left behind). */
function waitFor(check, { timeoutMs = 30000, everyMs = 100, wanted = () => true } = {}) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = () => {
      if (!wanted()) {
        reject(new Error('no longer wanted'));
        return;
      }
      let value = null;
      try {
        value = check();
      } catch (error) {
        value = null;
      }
      if (value) {
        resolve(value);
      } else if (Date.now() - started > timeoutMs) {
        reject(new Error('timed out'));
      } else {
        setTimeout(poll, everyMs);
      }
    };
    poll();
  });
}

/**
 * The compare view of one viewer. `controller`: the panel's (logic.createController); `services()`: OHIF's services
 * (servicesManager.services); `extensionManager`: OHIF's; `hostElement`: makes a React host element (extension.js);
 * `fetch`, `headers()`: for /api/v1/explain. model() is what the panel draws: {status: 'off' | 'loading' | 'on' |
 * 'error', rank, label, sync, message}.
 */
export function createCompare({ controller, services, extensionManager, hostElement, fetch: fetchImpl,
  headers = () => ({}), doc = globalThis.document } = {}) {
  const listeners = new Set();
  const labels = new Map(); // viewportId → label text, read by the overlay customization
  // query: the panel's query when the comparison was opened (a later search does not change the images shown)
  let state = { status: 'off', sync: false, item: null, query: null, indexed: true, message: '' };
  let hitViewportId = HIT_VIEWPORT_ID;
  let opened = 0; // a newer open() wins over an older one still loading
  let overlays = null; // {key, images: [{element, img, update}]} while drawn
  const initialVoi = new Map(); // viewportId → its image's window when the comparison opened

  function set(change) {
    state = { ...state, ...change };
    listeners.forEach(listener => listener(state));
  }

  function ensureLabelItem() {
    const { customizationService } = services();
    const items = customizationService.getCustomization('viewportOverlay.topLeft') || [];
    if (items.some(item => item?.id === LABEL_ITEM_ID)) {
      return;
    }
    customizationService.setCustomizations({
      'viewportOverlay.topLeft': {
        $unshift: [{
          id: LABEL_ITEM_ID,
          condition: ({ viewportId }) => labels.has(viewportId),
          contentF: ({ viewportId }) => hostElement('div', {
            className: `medsim-compare-label${viewportId === QUERY_VIEWPORT_ID ? ' medsim-compare-label-query' : ''}`,
            'data-cy': 'medsim-compare-label',
            'data-viewport-id': viewportId,
            children: labels.get(viewportId),
          }),
        }],
      },
    });
  }

  /** The image `sopUid` of `studyUid` in the viewer, loading its study through the active data source. */
  async function loadImage(studyUid, sopUid) {
    const { displaySetService } = services();
    const present = () => findImage(displaySetService.getActiveDisplaySets(), sopUid);
    if (present()) {
      return present();
    }
    if (!displaySetService.getActiveDisplaySets().some(ds => ds.StudyInstanceUID === studyUid)) {
      const dataSource = extensionManager.getActiveDataSource()[0];
      await dataSource.retrieve.series.metadata({ StudyInstanceUID: studyUid });
    }
    return waitFor(present);
  }

  function cornerstoneViewport(viewportId) {
    try {
      return services().cornerstoneViewportService?.getCornerstoneViewport?.(viewportId) || null;
    } catch (error) {
      return null;
    }
  }

  /** Our synchronizer type, registered once with OHIF's syncGroupService (OHIF's 'voi' without cornerstone's tools,
   * which OHIF puts at window.cornerstoneTools). */
  function syncType() {
    const { syncGroupService } = services();
    const createSynchronizer = globalThis.cornerstoneTools?.SynchronizerManager?.createSynchronizer;
    if (!createSynchronizer || !syncGroupService?.addSynchronizerType) {
      return 'voi';
    }
    if (!syncGroupService.getSyncCreatorForType?.(VOI_SYNC_TYPE)) {
      syncGroupService.addSynchronizerType(VOI_SYNC_TYPE, id => createSynchronizer(id, VOI_MODIFIED,
        (synchronizer, source, target, event) => {
          const from = initialVoi.get(source.viewportId);
          const to = initialVoi.get(target.viewportId);
          const viewport = cornerstoneViewport(target.viewportId);
          const range = event?.detail?.range;
          if (from && to && viewport && range) {
            viewport.setProperties({ voiRange: relativeVoi(range, from, to) });
            viewport.render();
          }
        }));
    }
    return VOI_SYNC_TYPE;
  }

  /** Each image's window once drawn: what window/level sync is relative to. */
  function recordInitialVoi(viewportIds) {
    initialVoi.clear();
    const voi = id => {
      const viewport = cornerstoneViewport(id);
      return viewport?.getImageData?.() ? viewport.getProperties?.()?.voiRange : null;
    };
    const comparing = state.item;
    return waitFor(() => viewportIds.every(voi), { wanted: () => state.item === comparing })
      .then(() => viewportIds.forEach(id => initialVoi.set(id, { ...voi(id) })))
      .catch(() => {}); // without both windows the sync carries nothing over
  }

  function setSyncGroup(on) {
    const { syncGroupService } = services();
    for (const viewportId of [QUERY_VIEWPORT_ID, hitViewportId]) {
      const viewport = cornerstoneViewport(viewportId);
      if (!viewport || !syncGroupService) {
        continue;
      }
      const engineId = viewport.getRenderingEngine().id;
      if (on) {
        syncGroupService.addViewportToSyncGroup(viewportId, engineId, voiSyncGroup(syncType()));
      } else {
        syncGroupService.removeViewportFromSyncGroup(viewportId, engineId, VOI_SYNC_ID);
      }
    }
  }

  // -- "where they match" in the viewports ---------------------------------------------------------------------------

  function removeOverlays() {
    for (const { element, img, update } of overlays?.images || []) {
      element.removeEventListener(CAMERA_MODIFIED, update);
      element.removeEventListener(IMAGE_RENDERED, update);
      img.remove();
    }
    overlays = null;
  }

  function placeOverlay(viewport, img) {
    const data = viewport.getImageData?.();
    if (!data?.dimensions) {
      return;
    }
    const [columns, rows] = data.dimensions;
    const canvas = point => viewport.worldToCanvas(indexToWorld(data, ...point));
    img.style.width = `${columns}px`;
    img.style.height = `${rows}px`;
    img.style.transform = overlayTransform(canvas([-0.5, -0.5]), canvas([columns - 0.5, -0.5]),
      canvas([-0.5, rows - 0.5]), columns, rows);
    img.dataset.columns = String(columns);
    img.dataset.rows = String(rows);
  }

  function attachOverlay(viewportId, src, role) {
    const viewport = cornerstoneViewport(viewportId);
    const element = viewport?.element;
    if (!element || !doc) {
      return null;
    }
    const host = element.querySelector('.viewport-element') || element;
    const img = doc.createElement('img');
    img.className = 'medsim-compare-overlay';
    img.alt = role === 'query' ? 'where the query matches the hit' : 'where the hit matches the query';
    img.dataset.cy = 'medsim-compare-overlay';
    img.dataset.role = role;
    img.src = src;
    const update = () => placeOverlay(cornerstoneViewport(viewportId) || viewport, img);
    update();
    host.appendChild(img);
    element.addEventListener(CAMERA_MODIFIED, update);
    element.addEventListener(IMAGE_RENDERED, update);
    return { element, img, update };
  }

  async function drawOverlays() {
    const item = state.item;
    const { query, indexed } = state;
    const key = item ? `${query?.sop_uid}|${item.sopUid}` : '';
    if (!item || !query || overlays?.key === key) {
      return;
    }
    removeOverlays();
    overlays = { key, images: [] };
    const mine = overlays;
    try {
      const url = explainUrl(controller.config.apiRoot, query, item.sopUid, { indexed, size: OVERLAY_SIZE });
      const found = await fetchJson(fetchImpl, url, { headers: headers(), timeoutMs: controller.config.timeoutMs });
      const viewportIds = [QUERY_VIEWPORT_ID, hitViewportId];
      await waitFor(() => viewportIds.every(id => cornerstoneViewport(id)?.getImageData?.()),
        { wanted: () => overlays === mine });
      if (overlays !== mine) {
        return; // closed, toggled off or another hit meanwhile
      }
      mine.images = [attachOverlay(QUERY_VIEWPORT_ID, found.query.overlay, 'query'),
        attachOverlay(hitViewportId, found.hit.overlay, 'hit')].filter(Boolean);
    } catch (error) {
      if (overlays === mine) {
        overlays = null; // the images stand without it; the toggle tries again
      }
    }
  }

  function followToggle() {
    if (state.status === 'on' && controller.getState().explain) {
      drawOverlays();
    } else if (overlays) {
      removeOverlays();
    }
  }

  controller.subscribe(followToggle);

  /** The user changed the layout by other means (OHIF's layout menu, a double click): the comparison is over. */
  let gridSubscription = null;
  function followGrid() {
    const grid = services().viewportGridService;
    if (gridSubscription || !grid?.subscribe || !grid.EVENTS?.GRID_STATE_CHANGED) {
      return;
    }
    gridSubscription = grid.subscribe(grid.EVENTS.GRID_STATE_CHANGED, () => {
      const viewports = grid.getState()?.viewports;
      const present = id => (viewports instanceof Map ? viewports.has(id) : !!viewports?.[id]);
      if (state.status === 'on' && !present(QUERY_VIEWPORT_ID) && !present(hitViewportId)) {
        opened += 1;
        removeOverlays();
        labels.clear();
        set({ status: 'off', item: null, query: null, message: '' });
      }
    });
  }

  // -- actions -------------------------------------------------------------------------------------------------------

  /** Query left, `item` (a panel item) right, in one row. Resolves when the grid is set (or failed). */
  async function open(item) {
    const query = controller.getState().query;
    if (!query || !item?.sopUid) {
      return state;
    }
    const mine = ++opened;
    removeOverlays();
    followGrid();
    set({ status: 'loading', item, query, indexed: !!controller.getState().response?.query?.indexed, message: '' });
    try {
      const [queryImage, hitImage] = await Promise.all([loadImage(query.study_uid, query.sop_uid),
        loadImage(item.studyUid, item.sopUid)]);
      if (mine !== opened) {
        return state;
      }
      ensureLabelItem();
      hitViewportId = `${HIT_VIEWPORT_ID}-${mine}`;
      const text = compareLabels(item);
      labels.clear();
      labels.set(QUERY_VIEWPORT_ID, text.query);
      labels.set(hitViewportId, text.hit);
      await services().viewportGridService.setLayout(compareLayout(queryImage, hitImage,
        { sync: state.sync, syncType: syncType(), hitViewportId }));
      recordInitialVoi([QUERY_VIEWPORT_ID, hitViewportId]);
      set({ status: 'on' });
      followToggle();
    } catch (error) {
      if (mine === opened) {
        set({ status: 'error', message: 'The viewer could not load this study for the comparison.' });
      }
    }
    return state;
  }

  /** Window/level of the two images linked (on) or not. */
  function setSync(on) {
    set({ sync: !!on });
    if (state.status === 'on') {
      setSyncGroup(!!on);
    }
    return state;
  }

  /** Back to the query alone in one viewport. */
  async function close() {
    opened += 1;
    removeOverlays();
    const query = state.query;
    const wasOn = state.status === 'on';
    if (wasOn) {
      setSyncGroup(false);
    }
    labels.clear();
    set({ status: 'off', item: null, query: null, message: '' });
    const queryImage = query && findImage(services().displaySetService.getActiveDisplaySets(), query.sop_uid);
    if (wasOn && queryImage) {
      const single = compareViewport('default', queryImage);
      await services().viewportGridService.setLayout({ numRows: 1, numCols: 1, activeViewportId: 'default',
        findOrCreateViewport: position => (position === 0 ? structuredClone(single) : null) });
    }
    return state;
  }

  return {
    open,
    close,
    setSync,
    /** What the panel shows: {status, rank, label, sync, message}. */
    model: () => ({ status: state.status, sync: state.sync, message: state.message,
      rank: state.item ? state.item.rank : null, label: state.item ? compareLabels(state.item).hit : '' }),
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
  };
}
