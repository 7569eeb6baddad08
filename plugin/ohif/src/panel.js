/**
 * The "Similar cases" panel's DOM: draws logic.panelModel(state) into a container element.
 *
 * The prebuilt OHIF viewer does not hand React to run-time plugins, so the panel is plain DOM that the
 * extension mounts into a host element (see extension.js). Text is always set with textContent (never HTML).
 */

import { STATUS } from './logic.js';
import { renderCohort } from './cohort.js';
import { feedbackBar, voteButtons } from './feedback.js';

function el(doc, tag, attrs = {}, children = []) {
  const node = doc.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) {
      continue;
    }
    if (name === 'text') {
      node.textContent = String(value);
    } else if (name === 'onClick') {
      node.addEventListener('click', value);
    } else if (name === 'className') {
      node.className = value;
    } else {
      node.setAttribute(name, value === true ? '' : String(value));
    }
  }
  for (const child of [].concat(children)) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    node.appendChild(typeof child === 'string' ? doc.createTextNode(child) : child);
  }
  return node;
}

function button(doc, label, onClick, attrs = {}) {
  return el(doc, 'button', { type: 'button', className: 'medsim-button', onClick, ...attrs, text: label });
}

function renderIdle(doc) {
  return el(doc, 'div', { className: 'medsim-state', 'data-cy': 'medsim-state', 'data-state': 'idle' }, [
    el(doc, 'p', { text: 'Click "Find similar cases" in the toolbar to search for cases of other patients that ' +
      'look like the image in the active viewport.' }),
  ]);
}

function renderLoading(doc) {
  return el(doc, 'div', { className: 'medsim-state medsim-loading', 'data-cy': 'medsim-state', 'data-state': 'loading',
    role: 'status', 'aria-live': 'polite' }, [
    el(doc, 'span', { className: 'medsim-spinner', 'aria-hidden': 'true' }),
    el(doc, 'span', { text: 'Searching for similar cases…' }),
  ]);
}

function renderError(doc, model, actions) {
  const error = model.error || {};
  return el(doc, 'div', { className: `medsim-state medsim-error medsim-error-${error.kind || 'unknown'}`,
    'data-cy': 'medsim-state', 'data-state': 'error', 'data-error-kind': error.kind || '', role: 'alert' }, [
    el(doc, 'h4', { text: error.title || 'Something went wrong' }),
    el(doc, 'p', { text: error.message || '' }),
    error.retry ? button(doc, 'Try again', actions.retry, { 'data-cy': 'medsim-retry' }) : null,
  ]);
}

function queryLine(doc, model) {
  const query = model.query || {};
  const bits = [];
  if (query.findings && query.findings.length) {
    bits.push(`findings: ${query.findings.join(', ')}`);
  }
  if (query.view) {
    bits.push(`view ${query.view}`);
  }
  bits.push(query.indexed ? 'indexed' : 'fetched from the PACS');
  return el(doc, 'div', { className: 'medsim-query', 'data-cy': 'medsim-query' }, [
    el(doc, 'span', { className: 'medsim-muted', text: 'Query image: ' }),
    bits.join(' · '),
  ]);
}

function renderItem(doc, item, actions = {}, feedback = null) {
  const meta = [item.date, item.description].filter(Boolean).join(' · ');
  const findings = el(doc, 'div', { className: 'medsim-findings' },
    item.findings.length
      ? item.findings.map(f => el(doc, 'span', {
        className: `medsim-chip${item.shared.includes(f) ? ' medsim-chip-shared' : ''}`,
        title: item.shared.includes(f) ? 'shared with the query image' : undefined,
        text: f,
      }))
      : [el(doc, 'span', { className: 'medsim-muted', text: 'no findings recorded' })]);
  const image = item.thumbnailUrl
    ? el(doc, 'img', { className: 'medsim-thumb', src: item.thumbnailUrl, alt: `thumbnail of result ${item.rank}`,
      loading: 'lazy', width: 96, height: 96 })
    : el(doc, 'div', { className: 'medsim-thumb medsim-thumb-missing', text: 'no preview' });
  // "where they match": the overlay has the image's aspect ratio and is fitted like the thumbnail (contain), so
  // it lies exactly on it
  const thumb = item.overlay
    ? el(doc, 'div', { className: 'medsim-thumb-stack' }, [
      image,
      el(doc, 'img', { className: 'medsim-overlay', src: item.overlay, alt: `where result ${item.rank} matches`,
        'data-cy': 'medsim-overlay', width: 96, height: 96 }),
    ])
    : image;
  return el(doc, 'li', { className: 'medsim-result', 'data-cy': 'medsim-result', 'data-rank': item.rank,
    'data-study-uid': item.studyUid, 'data-sop-uid': item.sopUid, 'data-findings': item.findings.join('|'),
    'data-patient': item.patient, 'data-score': item.score }, [
    el(doc, 'a', { className: 'medsim-result-link', href: item.openUrl, target: '_blank', rel: 'noopener',
      title: 'Open this study in a new tab', 'data-cy': 'medsim-open-study' }, [
      thumb,
      el(doc, 'div', { className: 'medsim-result-body' }, [
        el(doc, 'div', { className: 'medsim-result-head' }, [
          el(doc, 'span', { className: 'medsim-rank', text: `#${item.rank}` }),
          el(doc, 'span', { className: 'medsim-score', title: 'cosine similarity', text: item.scoreText }),
        ]),
        findings,
        meta ? el(doc, 'div', { className: 'medsim-meta', 'data-cy': 'medsim-study-meta', text: meta }) : null,
        el(doc, 'div', { className: 'medsim-muted medsim-small', text: [
          item.view ? `view ${item.view}` : '',
          item.matchedImages > 1 ? `${item.matchedImages} images matched` : '',
        ].filter(Boolean).join(' · ') }),
      ]),
    ]),
    actions.compare
      ? button(doc, 'compare', () => actions.compare(item), { className: 'medsim-button medsim-compare',
        'data-cy': 'medsim-compare', title: 'The query image left, this one right, in this viewer' })
      : null,
    feedback ? voteButtons(doc, item, feedback, actions) : null,
  ]);
}

function renderControls(doc, model, actions) {
  const chips = (model.chips || []).map(chip => el(doc, 'button', { type: 'button',
    className: `medsim-filter-chip${chip.on ? ' medsim-filter-chip-on' : ''}`, 'data-cy': 'medsim-filter-chip',
    'data-chip': chip.id, 'aria-pressed': chip.on ? 'true' : 'false', disabled: chip.disabled,
    title: chip.disabled ? 'the query image has no recorded findings' : undefined,
    onClick: () => actions.toggleChip(chip.id), text: chip.label }));
  return el(doc, 'div', { className: 'medsim-controls' }, [
    el(doc, 'div', { className: 'medsim-filter-chips', 'data-cy': 'medsim-filters', role: 'group',
      'aria-label': 'filters' }, chips),
    el(doc, 'label', { className: 'medsim-explain-toggle' }, [
      el(doc, 'input', { type: 'checkbox', 'data-cy': 'medsim-explain-toggle', checked: model.explain,
        onClick: () => actions.toggleExplain() }),
      ' where they match',
    ]),
  ]);
}

/** The side-by-side bar (compare.js model): what is compared, window/level sync, back to one image. */
function renderCompareBar(doc, compare, actions) {
  if (!compare || compare.status === 'off') {
    return null;
  }
  const text = { loading: `Opening ${compare.label} side by side…`, on: `Side by side: query | ${compare.label}`,
    error: compare.message }[compare.status] || '';
  return el(doc, 'div', { className: 'medsim-compare-bar', 'data-cy': 'medsim-compare-bar',
    'data-status': compare.status, 'data-rank': compare.rank }, [
    el(doc, 'span', { text }),
    el(doc, 'label', { className: 'medsim-explain-toggle' }, [
      el(doc, 'input', { type: 'checkbox', 'data-cy': 'medsim-compare-sync', checked: compare.sync,
        onClick: event => actions.syncCompare(event.target.checked) }),
      ' sync window/level',
    ]),
    button(doc, 'close', actions.closeCompare, { className: 'medsim-button medsim-link-button',
      'data-cy': 'medsim-compare-close', title: 'Back to the query image alone' }),
  ]);
}

function renderResults(doc, model, actions) {
  const children = [
    queryLine(doc, model),
    el(doc, 'div', { className: 'medsim-op', 'data-cy': 'medsim-operating-point' }, [
      el(doc, 'div', { text: model.operatingPointText }),
      model.calibrationText
        ? el(doc, 'div', { className: 'medsim-muted medsim-small', 'data-cy': 'medsim-calibration',
          text: model.calibrationText })
        : null,
      model.operatingPointWarning
        ? el(doc, 'div', { className: 'medsim-op-warning', 'data-cy': 'medsim-op-warning', role: 'note',
          text: `⚠ ${model.operatingPointWarning}` })
        : null,
    ]),
    renderControls(doc, model, actions),
    renderCompareBar(doc, model.compare, actions),
    model.feedback ? feedbackBar(doc, model.feedback, actions) : null,
  ];
  if (model.status === STATUS.EMPTY) {
    children.push(el(doc, 'div', { className: 'medsim-state medsim-empty', 'data-cy': 'medsim-state',
      'data-state': 'empty' }, [
      el(doc, 'p', { text: model.emptyMessage }),
      model.offerShowAnyway
        ? button(doc, 'Show top 10 anyway', actions.showAnyway, { 'data-cy': 'medsim-show-anyway' })
        : null,
    ]));
  } else {
    children.push(el(doc, 'ol', { className: 'medsim-results', 'data-cy': 'medsim-results',
      'data-state': 'results' }, model.items.map(item => renderItem(doc, item, actions, model.feedback))));
  }
  children.push(renderCohort(doc, model.cohort, actions));
  children.push(el(doc, 'div', { className: 'medsim-muted medsim-small medsim-footer', text: [
    model.includeSamePatient ? 'same patient included' : 'other patients only',
    model.groupBy === 'study' ? 'best image per study' : 'every image',
    typeof model.tookMs === 'number' ? `${Math.round(model.tookMs)} ms` : '',
  ].filter(Boolean).join(' · ') }));
  return el(doc, 'div', { className: 'medsim-body' }, children);
}

/** Draw the panel for `model` (logic.panelModel) into `container`, replacing what was there. */
export function renderPanel(container, model, actions) {
  const doc = container.ownerDocument;
  let body;
  switch (model.status) {
    case STATUS.LOADING:
      body = renderLoading(doc);
      break;
    case STATUS.ERROR:
      body = renderError(doc, model, actions);
      break;
    case STATUS.RESULTS:
    case STATUS.EMPTY:
      body = renderResults(doc, model, actions);
      break;
    default:
      body = renderIdle(doc);
  }
  const root = el(doc, 'div', { className: 'medsim-panel', 'data-cy': 'medsim-similar-panel',
    'data-status': model.status }, [
    model.undrawable
      ? el(doc, 'div', { className: 'medsim-undrawable', 'data-cy': 'medsim-undrawable', role: 'note',
        text: model.undrawable })
      : null,
    el(doc, 'div', { className: 'medsim-header' }, [
      el(doc, 'h3', { text: 'Similar cases' }),
      model.status !== STATUS.IDLE && model.status !== STATUS.LOADING
        ? button(doc, 'Refresh', actions.retry, { className: 'medsim-button medsim-link-button',
          'data-cy': 'medsim-refresh', title: 'Search again for this image' })
        : null,
    ]),
    body,
  ]);
  container.replaceChildren(root);
}

/** A view bound to a controller (and, optional, a compare.js view and a feedback.js state): mount(node) draws and
 * follows the state, unmount() stops. */
export function createPanelView(controller, compare = null, feedback = null, cohort = null) {
  let node = null;
  let unsubscribe = null;
  const actions = {
    ...(compare ? { compare: item => compare.open(item), syncCompare: on => compare.setSync(on),
      closeCompare: () => compare.close() } : {}),
    retry: () => controller.retry(),
    showAnyway: () => controller.showAnyway(),
    toggleChip: id => (controller.toggleChip ? controller.toggleChip(id) : null),
    toggleExplain: () => (controller.toggleExplain ? controller.toggleExplain() : null),
    ...(cohort ? { exportCohort: format => cohort.run(format) } : {}),
    ...(feedback ? { vote: (item, direction) => feedback.vote(item, direction), refine: () => feedback.refine() }
      : {}),
  };
  const draw = () => {
    if (node) {
      renderPanel(node, { ...controller.model(), ...(compare ? { compare: compare.model() } : {}),
        ...(feedback ? { feedback: feedback.model() } : {}), ...(cohort ? { cohort: cohort.model() } : {}) }, actions);
    }
  };
  return {
    mount(element) {
      if (node === element) {
        return;
      }
      this.unmount();
      node = element;
      const unsubscribers = [controller.subscribe(draw), compare?.subscribe(draw), feedback?.subscribe(draw),
        cohort?.subscribe(draw)]
        .filter(Boolean);
      unsubscribe = () => unsubscribers.forEach(stop => stop());
      draw();
    },
    unmount() {
      if (unsubscribe) {
        unsubscribe();
      }
      unsubscribe = null;
      node = null;
    },
  };
}
