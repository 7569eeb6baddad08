/**
 * medsim "Find similar cases": the plugin's logic, free of DOM and OHIF (unit-tested with `node --test`).
 *
 * - queryFromInstance / precheck: which image is asked about, and whether it can be a chest radiograph;
 * - similarRequest / fetchJson: the API calls (POST /api/v1/similar, GET /api/v1/cases/<sop>), fetch injected;
 * - qidoStudyLookup: a study's date and description from the PACS (QIDO-RS);
 * - classifyFailure: what went wrong, as one of the panel's error states;
 * - operatingPointText / toViewModel: the API's answer as what the panel shows;
 * - reducer: the panel's state machine (idle → loading → results | empty | error);
 * - fixVoiLutFunction: a work-around for OHIF 3.13.2 drawing no image when VOILUTFunction is set;
 * - createController: runs the effects (API calls, study look-ups) and holds the state; the DOM subscribes to it.
 */

export const DEFAULT_CONFIG = Object.freeze({
  apiRoot: '/api/v1',
  modeRoute: 'similar',
  routerBasename: '/',
  showAnywayK: 10,
  timeoutMs: 60000,
});

/** Modalities that are never projection radiographs: the panel says so without asking the server. */
export const NOT_RADIOGRAPH_MODALITIES = new Set([
  'CT', 'MR', 'PT', 'NM', 'US', 'MG', 'XA', 'RF', 'OCT', 'OP', 'ES', 'SM', 'IVUS', 'SR', 'SEG', 'RTSTRUCT',
  'RTPLAN', 'RTDOSE', 'PR', 'KO', 'DOC', 'ECG', 'HD', 'AU', 'REG',
]);

/** Error codes of the API (see docs/openapi.yaml) that mean "this image cannot be searched". */
const NOT_CHEST_CODES = new Set(['not-chest-radiograph', 'not-an-image', 'unsupported']);

export const STATUS = Object.freeze({
  IDLE: 'idle',
  LOADING: 'loading',
  RESULTS: 'results',
  EMPTY: 'empty',
  ERROR: 'error',
});

export const ERROR_KINDS = Object.freeze({
  UNREACHABLE: 'unreachable',
  NOT_CHEST: 'not-chest',
  AUTH: 'auth',
  NOT_FOUND: 'not-found',
  PACS: 'pacs',
  SERVER: 'server',
  NO_IMAGE: 'no-image',
  BAD_REQUEST: 'bad-request',
});

// ---- the query ------------------------------------------------------------------------------------------------------

function str(value) {
  if (value === undefined || value === null) {
    return '';
  }
  if (Array.isArray(value)) {
    return value.length ? str(value[0]) : '';
  }
  return String(value).trim();
}

/**
 * The query from an OHIF instance (naturalized DICOM metadata of the displayed image), or null when there is none.
 * `fallback` carries values of the display set (e.g. its Modality) for instances that lack them.
 */
export function queryFromInstance(instance, fallback = {}) {
  if (!instance || typeof instance !== 'object') {
    return null;
  }
  const query = {
    study_uid: str(instance.StudyInstanceUID) || str(fallback.StudyInstanceUID),
    series_uid: str(instance.SeriesInstanceUID) || str(fallback.SeriesInstanceUID),
    sop_uid: str(instance.SOPInstanceUID),
    modality: (str(instance.Modality) || str(fallback.Modality)).toUpperCase(),
    bodyPart: (str(instance.BodyPartExamined) || str(fallback.BodyPartExamined)).toUpperCase(),
  };
  const transferSyntax = str(instance.AvailableTransferSyntaxUID) || str(instance.TransferSyntaxUID);
  if (transferSyntax) {
    query.transferSyntax = transferSyntax;
  }
  return query.sop_uid ? query : null;
}

/** Transfer syntaxes OHIF 3.13's image loader cannot decode: the viewport stays black for them. */
export const UNDRAWABLE_TRANSFER_SYNTAXES = Object.freeze({
  '1.2.840.10008.1.2.1.99': 'Deflated Explicit VR Little Endian',
});

/** Why the viewer cannot draw an image of this transfer syntax (a sentence for the panel), or ''. */
export function undrawableReason(transferSyntax) {
  const name = UNDRAWABLE_TRANSFER_SYNTAXES[str(transferSyntax)];
  return name
    ? `The viewer cannot draw this image (${name} transfer syntax), so the viewport stays black; ` +
      'similar cases are still found: medsim decodes it itself.'
    : '';
}

/** An error state before any request: no image, or an image that cannot be a chest radiograph. Else null. */
export function precheck(query) {
  if (!query) {
    return {
      kind: ERROR_KINDS.NO_IMAGE,
      title: 'No image to search with',
      message: 'Open a chest radiograph in the active viewport, then click "Find similar cases".',
      retry: true,
    };
  }
  if (query.modality && NOT_RADIOGRAPH_MODALITIES.has(query.modality)) {
    return {
      kind: ERROR_KINDS.NOT_CHEST,
      title: 'Not a chest radiograph',
      message: `This image is ${query.modality}${query.bodyPart ? ` of the ${query.bodyPart.toLowerCase()}` : ''}; ` +
        'similar cases are found for chest radiographs (CR/DX) only.',
      retry: false,
    };
  }
  return null;
}

/** The JSON body of POST /similar. `showAnyway`: the plain top k, ignoring the calibrated threshold;
 * `filters`: the API's filters object (chips), left out when empty. */
export function similarRequest(query, { showAnyway = false, k, filters } = {}) {
  const body = { study_uid: query.study_uid, series_uid: query.series_uid, sop_uid: query.sop_uid };
  if (showAnyway) {
    body.threshold = 'none';
    body.k = k || DEFAULT_CONFIG.showAnywayK;
  } else if (k) {
    body.k = k;
  }
  if (filters && Object.keys(filters).length) {
    body.filters = filters;
  }
  return body;
}

/** The filter chips of the panel: id → the part of the API's `filters` object it sets (one chip per group). */
export const FILTER_CHIPS = Object.freeze([
  { id: 'view-frontal', group: 'view', label: 'Frontal', value: 'frontal' },
  { id: 'view-lateral', group: 'view', label: 'Lateral', value: 'lateral' },
  { id: 'view-any', group: 'view', label: 'Any view', value: 'any' },
  { id: 'sex-F', group: 'sex', label: 'Female', value: 'F' },
  { id: 'sex-M', group: 'sex', label: 'Male', value: 'M' },
  { id: 'findings-query', group: 'findings', label: 'Same findings', value: 'query' },
  // age bands in years, bounds included (ages are whole years, except infants', who fall in the first band)
  { id: 'age-0-17', group: 'age', label: 'Age 0–17', value: { min: 0, max: 17 } },
  { id: 'age-18-39', group: 'age', label: '18–39', value: { min: 18, max: 39 } },
  { id: 'age-40-64', group: 'age', label: '40–64', value: { min: 40, max: 64 } },
  { id: 'age-65', group: 'age', label: '65+', value: { min: 65 } },
  { id: 'modality-CR', group: 'modality', label: 'CR', value: 'CR' },
  { id: 'modality-DX', group: 'modality', label: 'DX', value: 'DX' },
  // study date: from a date before today (the API's study_date range)
  { id: 'date-1y', group: 'study_date', label: 'Past year', value: { yearsBack: 1 } },
  { id: 'date-5y', group: 'study_date', label: 'Past 5 years', value: { yearsBack: 5 } },
]);

/** "YYYY-MM-DD" of the day `years` before `now` (local calendar). */
export function yearsBefore(now, years) {
  const day = new Date(now.getFullYear() - years, now.getMonth(), now.getDate());
  const pad = n => String(n).padStart(2, '0');
  return `${day.getFullYear()}-${pad(day.getMonth() + 1)}-${pad(day.getDate())}`;
}

/** The API's filters object for the chips that are on (`active`: {group: chip id}); `queryLabels` for "same
 * findings" (a chip that needs them is left out while they are unknown); `now` for the study-date chips. */
export function filtersFromChips(active = {}, queryLabels = null, now = new Date()) {
  const filters = {};
  for (const chip of FILTER_CHIPS) {
    if (active[chip.group] !== chip.id) {
      continue;
    }
    if (chip.group === 'findings') {
      if (queryLabels && queryLabels.length) {
        filters.findings = { any: queryLabels.slice(0, 50) };
      }
    } else if (chip.group === 'study_date') {
      filters.study_date = { from: yearsBefore(now, chip.value.yearsBack) };
    } else {
      filters[chip.group] = chip.value;
    }
  }
  return filters;
}

/** GET /explain for a hit of `query` (the query's study and series too when it is not indexed). */
export function explainUrl(apiRoot, query, hitSopUid, { indexed = true, size = 96 } = {}) {
  const params = new URLSearchParams({ query: query.sop_uid, hit: hitSopUid, size: String(size) });
  if (!indexed) {
    params.set('study_uid', query.study_uid);
    params.set('series_uid', query.series_uid);
  }
  return joinUrl(apiRoot, `explain?${params.toString()}`);
}

// ---- viewer workaround ----------------------------------------------------------------------------------------------

/**
 * OHIF 3.13.2's image loader reads VOI LUT Function as a list (`voiLUTFunction[0]`) while its metadata provider hands
 * it the DICOM string, so an image with VOILUTFunction "LINEAR" gets the function "L" and is not drawn ("Invalid VOI
 * LUT function"). Wrapping the string in a list (what the loader expects) makes those images render; instances that
 * already hold a list, or no VOILUTFunction, are left alone. Returns how many instances were changed.
 */
export function fixVoiLutFunction(instances) {
  let changed = 0;
  for (const instance of instances || []) {
    if (instance && typeof instance.VOILUTFunction === 'string' && instance.VOILUTFunction) {
      instance.VOILUTFunction = [instance.VOILUTFunction.trim()];
      changed += 1;
    }
  }
  return changed;
}

// ---- HTTP -----------------------------------------------------------------------------------------------------------

/** A failed API call: `status` 0 means no HTTP answer at all (network error or timeout). */
export class ApiFailure extends Error {
  constructor({ status = 0, body = null, networkError = null, timedOut = false, url = '' }) {
    super(body?.error?.message || networkError?.message || `HTTP ${status}`);
    this.name = 'ApiFailure';
    this.status = status;
    this.body = body;
    this.networkError = networkError;
    this.timedOut = timedOut;
    this.url = url;
  }
}

export function joinUrl(root, path) {
  return `${String(root).replace(/\/+$/, '')}/${String(path).replace(/^\/+/, '')}`;
}

/**
 * fetch + JSON with a timeout; resolves to the parsed body of a 2xx answer, else rejects with an ApiFailure.
 * `fetchImpl` is the window's fetch in the browser, a fake in the tests.
 */
export async function fetchJson(fetchImpl, url, { method = 'GET', body, headers = {}, timeoutMs = 60000,
  allowArray = false } = {}) {
  const controller = typeof AbortController === 'function' ? new AbortController() : null;
  let timedOut = false;
  const timer = controller && timeoutMs > 0 ? setTimeout(() => {
    timedOut = true;
    controller.abort();
  }, timeoutMs) : null;
  let response;
  try {
    response = await fetchImpl(url, {
      method,
      headers: { Accept: 'application/json', ...(body ? { 'Content-Type': 'application/json' } : {}), ...headers },
      body: body ? JSON.stringify(body) : undefined,
      signal: controller?.signal,
      credentials: 'same-origin',
    });
  } catch (error) {
    throw new ApiFailure({ networkError: error, timedOut, url });
  } finally {
    if (timer) {
      clearTimeout(timer);
    }
  }
  let parsed = null;
  try {
    const text = await response.text();
    parsed = text ? JSON.parse(text) : null;
  } catch (error) {
    parsed = null;
  }
  if (!response.ok) {
    throw new ApiFailure({ status: response.status, body: parsed, url });
  }
  if (allowArray && (parsed === null || Array.isArray(parsed))) {
    return parsed || [];
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new ApiFailure({ status: response.status, body: null, url, networkError: new Error('not a JSON object') });
  }
  return parsed;
}

/** What went wrong, as one of the panel's error states: {kind, title, message, retry, status, code}. */
export function classifyFailure(failure) {
  const status = failure?.status ?? 0;
  const error = failure?.body?.error || {};
  const code = error.code || '';
  const detail = error.message || '';
  const base = { status, code };
  if (status === 0) {
    return {
      ...base,
      kind: ERROR_KINDS.UNREACHABLE,
      title: 'medsim server unreachable',
      message: failure?.timedOut
        ? 'The medsim server did not answer in time. It may be busy or stopped; try again in a moment.'
        : 'The similar-case service cannot be reached. Check that medsim serve is running, then try again.',
      retry: true,
    };
  }
  if (status === 401 || status === 403) {
    return {
      ...base,
      kind: ERROR_KINDS.AUTH,
      title: 'Not authorised',
      message: `The medsim server refused the request (${status}${detail ? `: ${detail}` : ''}). ` +
        'Open the viewer with a valid access token, or ask your administrator for one.',
      retry: false,
    };
  }
  if (NOT_CHEST_CODES.has(code) || (status === 422 && !code)) {
    return {
      ...base,
      kind: ERROR_KINDS.NOT_CHEST,
      title: 'Not a chest radiograph',
      message: detail || 'This image cannot be searched: similar cases are found for chest radiographs only.',
      retry: false,
    };
  }
  if (status === 404) {
    return {
      ...base,
      kind: ERROR_KINDS.NOT_FOUND,
      title: 'Image not found',
      message: detail || 'Neither the index nor the PACS holds this image.',
      retry: false,
    };
  }
  if (code.startsWith('pacs-') || ((status === 502 || status === 504) && code)) {
    return {
      ...base,
      kind: ERROR_KINDS.PACS,
      title: 'PACS not answering',
      message: `The medsim server could not get the image from the PACS${detail ? ` (${detail})` : ''}. ` +
        'Try again later.',
      retry: true,
    };
  }
  if (status === 502 || status === 503 || status === 504) {
    // a gateway's own answer (no medsim JSON error): the service behind it is down
    if (!code) {
      return {
        ...base,
        kind: ERROR_KINDS.UNREACHABLE,
        title: 'medsim server unreachable',
        message: `The similar-case service is not answering (HTTP ${status}). Try again in a moment.`,
        retry: true,
      };
    }
  }
  if (status >= 400 && status < 500) {
    return {
      ...base,
      kind: ERROR_KINDS.BAD_REQUEST,
      title: 'Request refused',
      message: detail || `The medsim server refused the request (HTTP ${status}).`,
      retry: false,
    };
  }
  return {
    ...base,
    kind: ERROR_KINDS.SERVER,
    title: 'medsim server error',
    message: `${detail || `HTTP ${status}`}${error.request_id ? ` (request ${error.request_id})` : ''}`,
    retry: true,
  };
}

// ---- study details (QIDO-RS) ---------------------------------------------------------------------------------------

/**
 * The QIDO-RS URL for one study's date and description. `includefield` is repeated rather than comma-separated:
 * some archives (Orthanc 1.10 with DICOMweb 1.7) ignore a percent-encoded comma ("%2C") in its value.
 */
export function qidoStudyUrl(qidoRoot, studyUid) {
  const params = new URLSearchParams();
  params.set('StudyInstanceUID', studyUid);
  params.append('includefield', '00080020');
  params.append('includefield', '00081030');
  return `${joinUrl(qidoRoot, 'studies')}?${params.toString()}`;
}

function dicomValue(item, tag) {
  const value = item?.[tag]?.Value;
  return Array.isArray(value) && value.length ? str(value[0]) : '';
}

/** {date, description} of `studyUid` in a QIDO-RS answer (DICOM JSON), or null when it is not there. */
export function studyInfoFromQido(answer, studyUid) {
  const items = Array.isArray(answer) ? answer : [];
  const item = items.find(i => dicomValue(i, '0020000D') === studyUid) || (items.length === 1 ? items[0] : null);
  return item ? { date: dicomValue(item, '00080020'), description: dicomValue(item, '00081030') } : null;
}

/** searchStudy(uid) for createController: QIDO-RS at `qidoRoot` with `fetchImpl` and `headers()`. */
export function qidoStudyLookup({ fetch: fetchImpl, qidoRoot, headers = () => ({}), timeoutMs = 20000 }) {
  return async studyUid => {
    const answer = await fetchJson(fetchImpl, qidoStudyUrl(qidoRoot, studyUid),
      { headers: { Accept: 'application/dicom+json', ...(headers() || {}) }, timeoutMs, allowArray: true });
    return studyInfoFromQido(answer, studyUid);
  };
}

// ---- view model -----------------------------------------------------------------------------------------------------

function percent(fraction) {
  const value = Math.round(fraction * 1000) / 10;
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

/** The operating point in words, e.g. "showing cases above the 90 %-recall threshold (similarity ≥ 0.857)". */
export function operatingPointText(op) {
  if (!op) {
    return '';
  }
  const k = op.k ? `, at most ${op.k}` : '';
  const threshold = typeof op.threshold === 'number' ? ` (similarity ≥ ${op.threshold.toFixed(3)})` : '';
  if ((op.mode === 'calibrated' || op.mode === 'target_recall') && typeof op.target_recall === 'number') {
    return `showing cases above the ${percent(op.target_recall)} %-recall threshold${threshold}${k}`;
  }
  if (op.mode === 'threshold' || (op.mode === 'calibrated' && typeof op.threshold === 'number')) {
    return `showing cases with similarity ≥ ${op.threshold.toFixed(3)}${k}`;
  }
  if (op.mode === 'top-k') {
    const why = /not calibrated/.test(op.source || '')
      ? ' (the index has no calibrated threshold)' : ', regardless of threshold';
    return `showing the top ${op.k} cases${why}`;
  }
  return `operating point: ${op.mode}${threshold}${k}`;
}

/** Which model answered and what its threshold was calibrated on, e.g. "model vgg16-imagenet-gap · threshold
 * calibrated on 16 labeled queries (8 patients)". */
export function calibrationText(op, model) {
  const bits = [];
  const name = (model && model.name) || (op && op.model) || '';
  if (name) {
    bits.push(`model ${name}`);
  }
  const on = op && op.calibrated_on;
  if (on && typeof on.queries === 'number') {
    const patients = typeof on.patients === 'number' ? ` (${on.patients} patients)` : '';
    bits.push(`threshold calibrated on ${on.queries} labeled queries${patients}`);
  }
  return bits.join(' · ');
}

/** Whether the empty answer was cut by a threshold (then "show top k anyway" can help). */
export function hasThreshold(op) {
  return !!op && op.mode !== 'top-k' && typeof op.threshold === 'number';
}

/** "20180105" → "2018-01-05"; anything else unchanged. */
export function formatDicomDate(value) {
  const text = str(value);
  const match = /^(\d{4})(\d{2})(\d{2})$/.exec(text);
  return match ? `${match[1]}-${match[2]}-${match[3]}` : text;
}

/** A viewer URL for one or more studies in this mode. */
export function studyUrl(studyUids, { origin = '', routerBasename = '/', modeRoute = 'similar', token } = {}) {
  const base = `${origin}${`/${String(routerBasename || '/').replace(/^\/+|\/+$/g, '')}/`.replace(/\/+/g, '/')}`;
  const params = new URLSearchParams();
  params.set('StudyInstanceUIDs', [].concat(studyUids).join(','));
  if (token) {
    params.set('token', token);
  }
  return `${base}${modeRoute}?${params.toString()}`;
}

function sharedFindings(labels, queryLabels) {
  if (!queryLabels || !queryLabels.length) {
    return [];
  }
  const wanted = new Set(queryLabels.map(l => l.toLowerCase()));
  return labels.filter(l => wanted.has(l.toLowerCase()));
}

/**
 * The API's answer as the panel shows it. `studies`: {study_uid: {date, description}} looked up in the PACS;
 * `queryLabels`: the query's findings when it is indexed; `urls`: options for studyUrl.
 */
export function toViewModel(response, { studies = {}, queryLabels = null, urls = {} } = {}) {
  const query = response?.query || {};
  const op = response?.operating_point || null;
  const items = (response?.results || []).map(row => {
    const labels = Array.isArray(row.labels) ? row.labels.map(String) : [];
    const info = studies[row.study_uid] || {};
    return {
      key: `${row.study_uid}/${row.sop_uid}`,
      rank: row.rank,
      score: row.score,
      scoreText: typeof row.score === 'number' ? row.score.toFixed(3) : '–',
      findings: labels,
      findingsText: labels.length ? labels.join(', ') : 'no findings recorded',
      shared: sharedFindings(labels, queryLabels),
      view: row.view || '',
      matchedImages: row.matched_images || 1,
      patient: row.patient || '',
      studyUid: row.study_uid,
      seriesUid: row.series_uid,
      sopUid: row.sop_uid,
      thumbnailUrl: row.thumbnail_url || '',
      date: formatDicomDate(info.date),
      description: info.description || '',
      openUrl: studyUrl(row.study_uid, urls),
    };
  });
  return {
    query: {
      studyUid: query.study_uid || '',
      sopUid: query.sop_uid || '',
      view: query.view || '',
      indexed: !!query.indexed,
      source: query.source || '',
      patient: query.patient || '',
      findings: queryLabels || null,
    },
    operatingPoint: op,
    operatingPointText: operatingPointText(op),
    calibrationText: calibrationText(op, response?.model),
    operatingPointWarning: (op && op.warning) || '',
    filters: response?.filters || {},
    includeSamePatient: !!response?.include_same_patient,
    groupBy: response?.group_by || 'study',
    items,
    tookMs: response?.took_ms,
  };
}

// ---- state machine --------------------------------------------------------------------------------------------------

export const initialState = Object.freeze({
  status: STATUS.IDLE,
  seq: 0,
  query: null,
  showAnyway: false,
  response: null,
  error: null,
  studies: {},
  queryLabels: null,
  chips: {},
  explain: false,
  overlays: {},
});

/**
 * The panel's states and what moves between them:
 *   start(query, showAnyway)   → loading (a new request number: answers to older requests are dropped)
 *   precheckFailed(query, error) → error
 *   succeeded(seq, response)   → results, or empty when nothing came back
 *   failed(seq, error)         → error
 *   studyInfo(studyUid, info) / queryLabels(seq, labels) → same state, details filled in
 *   reset                      → idle
 */
export function reducer(state = initialState, event = {}) {
  switch (event.type) {
    case 'start':
      return {
        ...initialState,
        studies: state.studies,
        chips: state.chips,
        explain: state.explain,
        status: STATUS.LOADING,
        seq: state.seq + 1,
        query: event.query,
        showAnyway: !!event.showAnyway,
        queryLabels: state.query && event.query && state.query.sop_uid === event.query.sop_uid
          ? state.queryLabels : null,
      };
    case 'precheckFailed':
      return { ...initialState, studies: state.studies, status: STATUS.ERROR, seq: state.seq + 1, query: event.query,
        error: event.error };
    case 'succeeded': {
      if (event.seq !== state.seq || state.status !== STATUS.LOADING) {
        return state;
      }
      const results = event.response?.results || [];
      return { ...state, status: results.length ? STATUS.RESULTS : STATUS.EMPTY, response: event.response,
        error: null };
    }
    case 'failed':
      if (event.seq !== state.seq || state.status !== STATUS.LOADING) {
        return state;
      }
      return { ...state, status: STATUS.ERROR, error: event.error, response: null };
    case 'studyInfo':
      if (!event.studyUid) {
        return state;
      }
      return { ...state, studies: { ...state.studies, [event.studyUid]: { ...(event.info || {}) } } };
    case 'queryLabels':
      if (event.seq !== state.seq) {
        return state;
      }
      return { ...state, queryLabels: Array.isArray(event.labels) ? event.labels : null };
    case 'reset':
      return { ...initialState, studies: state.studies, seq: state.seq + 1 };
    case 'chips':
      return { ...state, chips: { ...(event.chips || {}) } };
    case 'explain':
      return { ...state, explain: !!event.on };
    case 'overlay':
      if (event.seq !== state.seq) {
        return state;
      }
      return { ...state, overlays: { ...state.overlays, [event.sopUid]: event.overlay || '' } };
    default:
      return state;
  }
}

/** What the panel shows for a state (pure: the DOM code only draws this). */
export function panelModel(state, urls = {}) {
  const model = { status: state.status, query: state.query, showAnyway: state.showAnyway,
    // the viewer's metadata may not carry the transfer syntax (Orthanc's DICOMweb JSON does not): the answer does
    undrawable: undrawableReason((state.query && state.query.transferSyntax) || state.response?.query?.transfer_syntax),
    chips: FILTER_CHIPS.map(chip => ({ ...chip, on: (state.chips || {})[chip.group] === chip.id,
      disabled: chip.group === 'findings' && !(state.queryLabels && state.queryLabels.length) })),
    explain: !!state.explain };
  if (state.status === STATUS.ERROR) {
    model.error = state.error;
  }
  if (state.status === STATUS.RESULTS || state.status === STATUS.EMPTY) {
    const view = toViewModel(state.response, { studies: state.studies, queryLabels: state.queryLabels, urls });
    Object.assign(model, view);
    model.items.forEach(item => {
      item.overlay = state.explain ? ((state.overlays || {})[item.sopUid] || '') : '';
    });
    if (state.status === STATUS.EMPTY) {
      const cut = hasThreshold(view.operatingPoint);
      model.emptyMessage = cut
        ? `No case of another patient is above the ${typeof view.operatingPoint.target_recall === 'number'
          ? `${percent(view.operatingPoint.target_recall)} %-recall threshold` : 'similarity threshold'}.`
        : 'The index holds no case of another patient.';
      model.offerShowAnyway = cut && !state.showAnyway;
    }
  }
  return model;
}

// ---- controller -----------------------------------------------------------------------------------------------------

/**
 * Holds the panel's state and runs its effects.
 *   fetch           window.fetch (or a fake)
 *   config          {apiRoot, modeRoute, routerBasename, showAnywayK, timeoutMs, origin}
 *   authHeaders()   extra headers for the API (e.g. the OHIF user's bearer token), or {}
 *   searchStudy(uid) → Promise<{date, description} | null>   study details from the PACS (optional)
 */
export function createController({ fetch: fetchImpl, config = {}, authHeaders = () => ({}), searchStudy } = {}) {
  const cfg = { ...DEFAULT_CONFIG, ...config };
  let state = initialState;
  const listeners = new Set();

  function dispatch(event) {
    const next = reducer(state, event);
    if (next !== state) {
      state = next;
      listeners.forEach(listener => {
        try {
          listener(state);
        } catch (error) {
          // a broken listener must not stop the others
          if (typeof console !== 'undefined') {
            console.error('medsim panel listener failed', error);
          }
        }
      });
    }
    return state;
  }

  function headers() {
    try {
      return { ...(authHeaders() || {}) };
    } catch (error) {
      return {};
    }
  }

  async function lookUpStudies(results) {
    if (typeof searchStudy !== 'function') {
      return;
    }
    const uids = [...new Set(results.map(r => r.study_uid))].filter(uid => uid && !state.studies[uid]);
    await Promise.all(uids.map(async uid => {
      try {
        const info = await searchStudy(uid);
        if (info) {
          dispatch({ type: 'studyInfo', studyUid: uid,
            info: { date: info.date || '', description: info.description || '' } });
        }
      } catch (error) {
        // study details are a nicety: the results stand without them
      }
    }));
  }

  async function lookUpQueryLabels(seq, response) {
    if (!response?.query?.indexed || !response.query.sop_uid || state.queryLabels) {
      return;
    }
    try {
      const url = joinUrl(cfg.apiRoot, `cases/${encodeURIComponent(response.query.sop_uid)}`);
      const found = await fetchJson(fetchImpl, url, { headers: headers(), timeoutMs: cfg.timeoutMs });
      dispatch({ type: 'queryLabels', seq, labels: found.labels || [] });
    } catch (error) {
      // the query's own findings are shown only when known
    }
  }

  /** Ask for the cases similar to `query` (from queryFromInstance). Resolves when the panel has settled. `path`:
   * 'feedback/refine' asks the same with the query refined by the votes on its hits (feedback.js). */
  async function find(query, { showAnyway = false, path = 'similar' } = {}) {
    const early = precheck(query);
    if (early) {
      dispatch({ type: 'precheckFailed', query, error: early });
      return state;
    }
    dispatch({ type: 'start', query, showAnyway });
    const seq = state.seq;
    let response;
    try {
      response = await fetchJson(fetchImpl, joinUrl(cfg.apiRoot, path), {
        method: 'POST',
        body: similarRequest(query, { showAnyway, k: showAnyway ? cfg.showAnywayK : undefined,
          filters: filtersFromChips(state.chips, state.queryLabels) }),
        headers: headers(),
        timeoutMs: cfg.timeoutMs,
      });
    } catch (error) {
      const failure = error instanceof ApiFailure ? error : new ApiFailure({ networkError: error });
      dispatch({ type: 'failed', seq, error: classifyFailure(failure) });
      return state;
    }
    dispatch({ type: 'succeeded', seq, response });
    await Promise.all([lookUpQueryLabels(seq, response), lookUpStudies(response.results || []),
      state.explain ? explainResults(seq) : null]);
    return state;
  }

  /** Fetch the "where they match" overlays of the current results (hit side), one request per result. */
  async function explainResults(seq) {
    const response = state.response;
    if (!response || !state.query) {
      return;
    }
    const indexed = !!response.query?.indexed;
    await Promise.all((response.results || []).map(async row => {
      if (!row.sop_uid || (state.overlays || {})[row.sop_uid]) {
        return;
      }
      try {
        const found = await fetchJson(fetchImpl, explainUrl(cfg.apiRoot, state.query, row.sop_uid, { indexed }),
          { headers: headers(), timeoutMs: cfg.timeoutMs });
        const overlay = found?.hit?.overlay;
        if (typeof overlay === 'string' && overlay.startsWith('data:image/png;base64,')) {
          dispatch({ type: 'overlay', seq, sopUid: row.sop_uid, overlay });
        }
      } catch (error) {
        // an explanation is a nicety: the result stands without it
      }
    }));
  }

  /** Switch a filter chip (one per group; the same chip again switches it off) and search again. */
  function toggleChip(id) {
    const chip = FILTER_CHIPS.find(c => c.id === id);
    if (!chip) {
      return Promise.resolve(state);
    }
    const chips = { ...(state.chips || {}) };
    if (chips[chip.group] === id) {
      delete chips[chip.group];
    } else {
      chips[chip.group] = id;
    }
    dispatch({ type: 'chips', chips });
    return state.query ? find(state.query, { showAnyway: state.showAnyway }) : Promise.resolve(state);
  }

  /** The "where they match" toggle: overlays on every thumbnail. */
  function toggleExplain() {
    dispatch({ type: 'explain', on: !state.explain });
    return state.explain ? explainResults(state.seq).then(() => state) : Promise.resolve(state);
  }

  return {
    find,
    /** "Show top k anyway" for the current query. */
    showAnyway: () => (state.query ? find(state.query, { showAnyway: true }) : Promise.resolve(state)),
    retry: () => (state.query ? find(state.query, { showAnyway: state.showAnyway }) : Promise.resolve(state)),
    reset: () => dispatch({ type: 'reset' }),
    toggleChip,
    toggleExplain,
    getState: () => state,
    model: () => panelModel(state, {
      origin: cfg.origin || '',
      routerBasename: cfg.routerBasename,
      modeRoute: cfg.modeRoute,
      token: cfg.token ? cfg.token() : undefined,
    }),
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    config: cfg,
  };
}
